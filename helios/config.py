"""Engine options: the one definition, read by the engine, the CLI and the serving config schema.

A leaf module (dataclasses and validation only, no torch), so the controller and config
tools can import it without loading the engine. Each field's `help` (and `choices`) in its
metadata is what `helios generate --help` shows: the CLI options are generated from here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

GiB = 1 << 30
DEFAULT_MODEL = "smollm2-135m"
DTYPES = ("auto", "float32", "bfloat16", "float16")
EXIT_POLICIES = ("none", "batch", "token")
SCHEDULING_POLICIES = ("fcfs", "spf", "spf-reserve")
CONFIDENCE_MEASURES = ("max_prob", "margin", "saturation", "classifier")
DECODE_KERNELS = ("auto", "paged", "sdpa", "matmul")  # helios/attention.py
LINEAR_KERNELS = ("auto", "gguf", "onednn", "torch")  # helios/linears.py


def _option(default, help: str, **extra):
    """A field with its CLI help; `default_factory` for mutable defaults."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **extra})
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class EngineConfig:
    model: str = _option(DEFAULT_MODEL, "alias, Hugging Face folder or GGUF file")
    max_layers: int | None = _option(None, "load only layers 0..L-1 (HELIOS prefix mode; default: all)")
    device: str = _option("auto", "cuda when available, else cpu")
    dtype: str = _option("auto", "auto: bfloat16 on GPU, and on CPUs with bf16 matmuls for GGUF/half checkpoints",
                         choices=DTYPES)
    kv_cache_memory: int = _option(1 * GiB, "bytes of K/V for the loaded layers; sets the block count")
    block_size: int = _option(16, "tokens per KV block")
    max_num_seqs: int = _option(64, "sequences decoded per step at most")
    max_num_batched_tokens: int = _option(2048, "tokens per step at most (decodes first, then prompt chunks)")
    max_model_len: int | None = _option(None, "context length (default: the model's, capped by the cache)")
    exit_policy: str = _option("none", "none (full depth), batch (leave together) or token (each row its own exit)",
                               choices=EXIT_POLICIES)
    exit_layers: list[int] = _option([], "exit points in layers run, e.g. 6,12,18,24")
    exit_threshold: float = _option(0.9, "confidence threshold of exits without their own (untuned heads)")
    confidence: str | None = _option(None, "default: the exit heads' own measure, else max_prob",
                                     choices=CONFIDENCE_MEASURES)
    exit_heads: str | None = _option(None, "folder of tuned exit heads, or a shipped name "
                                           "(smollm2-135m, qwen2.5-coder-0.5b, gemma3-270m)")
    exit_target: float | None = _option(None, "token agreement the tuned heads' thresholds were calibrated for "
                                              "(e.g. 0.95)")
    # synthetic exits for benchmarks: {exit layer: probability}; checks still run, the
    # decision is drawn from this distribution instead of the confidence
    exit_profile: dict[int, float] | None = _option(None, "benchmarks only: {exit layer: share} to draw exits from",
                                                    cli=False)
    length_head: str | None = _option(None, "response-length head folder, or a shipped name (smollm2-135m); "
                                            "predicts each request's output tokens in its prefill")
    scheduling_policy: str = _option("fcfs", "fcfs; spf (shortest predicted first, with aging); spf-reserve "
                                             "(spf, admitting only when the predicted KV blocks fit); without a "
                                             "length_head spf orders as fcfs", choices=SCHEDULING_POLICIES)
    length_aging: float = _option(20.0, "spf aging: tokens of predicted length forgiven per second waited "
                                        "(a request is overtaken only by arrivals within predicted/aging s)")
    length_lookahead: int = _option(64, "spf: sequences admitted beyond max_num_seqs, prefilled so that their "
                                        "length is predicted, and parked until they rank among the "
                                        "max_num_seqs shortest (0: rank only sequences back from preemption)")
    decode_kernel: str = _option("auto", "decode attention: paged (C++ kernel reading the paged KV cache in place, "
                                         "CPU only, built on first use), sdpa (gather + scaled_dot_product_attention),"
                                         " matmul; auto: paged on CPU when it builds, else sdpa",
                                 choices=DECODE_KERNELS)
    linear_kernel: str = _option("auto", "linear layers on CPU: onednn (weights reordered once for oneDNN at load; "
                                         "no autograd), gguf (onednn, and calls of few rows read the GGUF file's "
                                         "Q4_1/Q8_0 blocks where the weights are exactly those; float32), torch "
                                         "(nn.Linear: MKL on CPU); auto: gguf in float32, onednn in other dtypes "
                                         "on a CPU that packs them, unless compile_layers, else torch",
                                 choices=LINEAR_KERNELS)
    compile_layers: bool = _option(False, "compile the layers' dense parts with torch.compile (inductor) at start-up; "
                                          "off: measured slower on a 2-core CPU (bench/results: decode step A/B)")
    seed: int = _option(0, "seed of the engine's own random draws (synthetic exits)", cli=False)

    def __post_init__(self) -> None:
        if self.exit_policy not in EXIT_POLICIES:
            raise ValueError(f"exit_policy must be one of {EXIT_POLICIES}, got {self.exit_policy!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.decode_kernel not in DECODE_KERNELS:
            raise ValueError(f"decode_kernel must be one of {DECODE_KERNELS}, got {self.decode_kernel!r}")
        if self.linear_kernel not in LINEAR_KERNELS:
            raise ValueError(f"linear_kernel must be one of {LINEAR_KERNELS}, got {self.linear_kernel!r}")
        if self.scheduling_policy not in SCHEDULING_POLICIES:
            raise ValueError(f"scheduling_policy must be one of {SCHEDULING_POLICIES}, got {self.scheduling_policy!r}")
        if self.confidence is not None and self.confidence not in CONFIDENCE_MEASURES:
            raise ValueError(f"confidence must be one of {CONFIDENCE_MEASURES}, got {self.confidence!r}")
        if self.length_lookahead < 0:
            raise ValueError(f"length_lookahead must be >= 0, got {self.length_lookahead}")
        for name in ("kv_cache_memory", "block_size", "max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.exit_target is not None and not (0 < self.exit_target <= 1 and self.exit_heads):
            raise ValueError("exit_target needs exit_heads and must be in (0, 1]")
        if any(layer < 1 for layer in self.exit_layers):
            raise ValueError(f"exit_layers count layers run and start at 1, got {self.exit_layers}")
