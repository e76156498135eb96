"""Helios: an early-exit-aware, iteration-level batching engine for Llama-family models."""

from helios.config import EngineConfig
from helios.engine import LLMEngine
from helios.outputs import RequestOutput
from helios.llm import LLM
from helios.sampling_params import SamplingParams

__all__ = ["LLM", "LLMEngine", "EngineConfig", "RequestOutput", "SamplingParams"]
