"""The HELIOS controller: SLO file, model repository, quality proxy, selector and (on Ray) the actor.

Imports from `helios` only its config and stats types (helios.config, helios.stats): the
selector is pure and runs without Ray or torch models.
"""
