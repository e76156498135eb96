"""Engine options: the one definition, reused by the CLI and the serving config schema."""

from __future__ import annotations

from dataclasses import dataclass, field

from helios.exits import CONFIDENCE_MEASURES, EXIT_POLICIES
from helios.loader import DEFAULT_MODEL

GiB = 1 << 30
DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class EngineConfig:
    model: str = DEFAULT_MODEL  # alias, Hugging Face folder or GGUF file
    max_layers: int | None = None  # load only layers 0..max_layers-1 (HELIOS prefix mode)
    device: str = "auto"  # "auto": cuda when available, else cpu
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16; "auto": see helios.loader.auto_dtype
    kv_cache_memory: int = 1 * GiB  # bytes of K/V for the loaded layers; sets the block count
    block_size: int = 16
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None  # default: the model's context, capped by the cache
    exit_policy: str = "none"  # none | batch | token
    exit_layers: list[int] = field(default_factory=list)  # exit points, in layers run (1-based)
    exit_threshold: float = 0.9  # for exit points without their own (untuned heads)
    confidence: str | None = None  # max_prob | margin | saturation | classifier; None: the heads' own, else max_prob
    exit_heads: str | None = None  # folder with tuned heads (exit_heads.json + .safetensors)
    exit_target: float | None = None  # agreement target to take the heads' calibrated thresholds for
    # synthetic exits for benchmarks: {exit layer: probability}; checks still run, the
    # decision is drawn from this distribution instead of the confidence
    exit_profile: dict[int, float] | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.exit_policy not in EXIT_POLICIES:
            raise ValueError(f"exit_policy must be one of {EXIT_POLICIES}, got {self.exit_policy!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.confidence is not None and self.confidence not in CONFIDENCE_MEASURES:
            raise ValueError(f"confidence must be one of {CONFIDENCE_MEASURES}, got {self.confidence!r}")
        for name in ("kv_cache_memory", "block_size", "max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.exit_target is not None and not (0 < self.exit_target <= 1 and self.exit_heads):
            raise ValueError("exit_target needs exit_heads and must be in (0, 1]")
        if any(layer < 1 for layer in self.exit_layers):
            raise ValueError(f"exit_layers count layers run and start at 1, got {self.exit_layers}")
