"""Helios: an early-exit-aware, iteration-level batching engine for Llama-family models.

The names below load on first use, so `import helios.config` or `helios.stats` (what a
controller needs) does not pull in torch and the model code.
"""

from __future__ import annotations

import importlib

_EXPORTS = {"LLM": "helios.llm", "LLMEngine": "helios.engine", "EngineConfig": "helios.config",
            "RequestOutput": "helios.outputs", "SamplingParams": "helios.sampling_params"}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'helios' has no attribute {name!r}")
