"""When a replica's choice has been replaced by one that is up: its cue to hand on unstarted requests.

Serve's rolling update reports the new version deployed only once every old replica has stopped,
that is after the old replicas have drained; waiting for that would hand nothing on. The new
replicas are up much sooner, and each replica of a linked model asks `superseded(tag)` every
second from the moment its engine is loaded (deployments/stats_forwarder.py). So a question is
also a sighting: a choice is up once one of its replicas has asked since its deploy began, and
then every other choice is superseded. A failed deploy leaves the old choice current again, and
its replicas hear "not superseded" at their next question.
"""

from __future__ import annotations

import time


class Handover:
    def __init__(self, clock=time.monotonic):
        self.clock = clock
        self.asked: dict[str, float] = {}  # tag -> when one of its replicas last asked
        self.deploy_started: dict[str, float] = {}  # tag -> when its latest deploy began

    def deploying(self, tag: str) -> None:
        """A deploy of `tag` begins: replicas of an earlier deploy of it do not count as up."""
        self.deploy_started[tag] = self.clock()

    def superseded(self, tag: str, current: str | None) -> bool:
        """A replica of `tag` asks; `current`: the choice being deployed, or else the one deployed."""
        self.asked[tag] = self.clock()
        if current is None or tag == current:
            return False
        return self.asked.get(current, float("-inf")) > self.deploy_started.get(current, float("-inf"))
