"""Command-line options generated from `EngineConfig`: one declaration of every engine setting.

Each field's `help` and `choices` come from its metadata in helios/config.py; a field
marked `cli=False` (benchmark-only settings) gets no option.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing

from helios.config import EngineConfig


def int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def float_list(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _parser_for(annotation) -> typing.Callable[[str], typing.Any]:
    """str -> value for a field's type (`int | None` parses as int)."""
    hint = annotation
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
    if typing.get_origin(hint) is list:
        return int_list if typing.get_args(hint) == (int,) else float_list
    return hint


def _engine_fields(only: set[str] | None) -> list[dataclasses.Field]:
    fields = [f for f in dataclasses.fields(EngineConfig) if f.metadata.get("cli", True)]
    return [f for f in fields if only is None or f.name in only]


def add_engine_arguments(parser: argparse.ArgumentParser, only: set[str] | None = None,
                         defaults: dict | None = None) -> None:
    """`--max-layers`, `--exit-policy`, ... for the EngineConfig fields in `only` (None: all)."""
    defaults = defaults or {}
    hints = typing.get_type_hints(EngineConfig)  # the annotations are strings (postponed evaluation)
    for f in _engine_fields(only):
        default = defaults.get(f.name, f.default if f.default is not dataclasses.MISSING else f.default_factory())
        if hints[f.name] is bool:  # a switch: --compile-layers / --no-compile-layers
            parser.add_argument("--" + f.name.replace("_", "-"), action=argparse.BooleanOptionalAction,
                                default=default, help=f.metadata["help"])
            continue
        parser.add_argument("--" + f.name.replace("_", "-"), type=_parser_for(hints[f.name]), default=default,
                            choices=f.metadata.get("choices"), help=f.metadata["help"])


def engine_options(args: argparse.Namespace, only: set[str] | None = None) -> dict:
    """The EngineConfig keyword arguments that `add_engine_arguments` added to `args`."""
    return {f.name: getattr(args, f.name) for f in _engine_fields(only)}
