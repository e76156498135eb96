"""Linear layers over oneDNN's prepacked weights (`linear_kernel: onednn`), for CPU decode.

Why: at decode's few rows per step, `nn.Linear` (MKL's sgemm on the plain [out, in] weight) is
well below what the CPU can do, and oneDNN on a weight reordered once into its blocked layout
(what inductor's freezing does for CPU linears) is not. Measured on a 2-core AMD EPYC (AVX2,
float32, weights of 30 SmolLM2 layers cycled so that they come from memory as in a real step):
the layers' projections at 32 rows 104 -> 77 ms, the 49,152-word LM head 35 -> 18 ms; at one row
40 -> 31 and 10 -> 7 ms. From 128 rows up (prefill) the two run at the same speed. Same float32
arithmetic: error against a float64 reference 2.5-5e-7 against MKL's 3.3-8.6e-7.
bench/results/README.md has the whole-step figures.

`linear_kernel: gguf` adds, for calls of at most GGUF_BLOCK_ROWS rows, Helios's kernel over GGUF
blocks (helios/csrc/gguf_linear.cpp) on weights that are exactly Q4_1 or Q8_0 blocks: those of a
GGUF file, which the loader dequantized. At a few rows a step's time is the weights' bytes, and a
block holds 32 weights in 20 or 34 bytes where float32 takes 128. Same weights, float32
arithmetic. Measured on the same CPU (the default model's 30 layers, weights from memory): one
row 23.9 -> 6.0 ms, 4 rows 24.7 -> 10.6, 8 rows 29.6 -> 19.8, 16 rows 40.1 -> 36.3, 32 rows 58.7
-> 70.4 (slower: from there oneDNN's compute wins), hence 16. Finding the blocks at load takes
0.2 s and they add their own bytes (106 MB for the default model).

`torch.ops.mkldnn._reorder_linear_weight` / `_linear_pointwise` are the ops inductor emits for
that. They have no autograd, and bfloat16 needs AVX-512 or AVX-NE-CONVERT, so `auto` packs only
where a probe reorder succeeds. Code that reads a projection's plain weight (bench/head_forms.py)
asks for `torch`; the LM head keeps its plain weight for ee-tune and the exit-head tools.
"""

from __future__ import annotations

import torch
from torch import nn

from helios.cpu_kernels import build_error, gguf_pack_op

# calls of at most this many rows run on GGUF blocks (linear_kernel: gguf): the measured crossover, above
GGUF_BLOCK_ROWS = 16


class PackedLinear(nn.Module):
    """`nn.Linear`'s forward over a weight reordered once for oneDNN. The packed weight is a buffer,
    so a model's buffer bytes count it. `keep_weight` keeps the plain weight too, under `weight`:
    the LM head's, which ee-tune and the exit-head tools read (for a tied head it is the
    embedding's own tensor, so keeping it costs nothing).

    `block_rows` > 0: where the weight is exactly GGUF Q4_1 or Q8_0 blocks (a GGUF file's, as the
    loader dequantized them), calls of at most `block_rows` rows run helios/csrc/gguf_linear.cpp
    over those blocks instead (buffers `codes`, `scales`, `minimums`); `block_rows` stays 0 where
    the weight is not."""

    def __init__(self, linear: nn.Linear, rows_hint: int, keep_weight: bool = False, block_rows: int = 0):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), rows_hint)
        self.register_buffer("packed", packed, persistent=False)
        self.bias = linear.bias
        if keep_weight:
            self.weight = linear.weight
        self.block_rows = 0
        blocks = gguf_blocks(linear.weight.detach()) if block_rows else None
        if blocks is not None:
            for name, tensor in zip(("codes", "scales", "minimums"), blocks):
                self.register_buffer(name, tensor, persistent=False)
            self.block_rows = block_rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.block_rows and x.shape[0] <= self.block_rows:
            return torch.ops.helios.gguf_linear(x, self.codes, self.scales, self.minimums, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


def gguf_blocks(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """(codes, scales, minimums) of a float32 weight that is exactly Q4_1 blocks (else Q8_0 blocks,
    `minimums` empty) along its rows; None when it is neither, or the kernels cannot be built."""
    pack = gguf_pack_op()
    if pack is None or weight.dtype != torch.float32 or weight.dim() != 2:
        return None
    for kind in (0, 1):  # Q4_1, Q8_0
        codes, scales, minimums = pack(weight, kind)
        if codes.numel():
            return codes, scales, minimums
    return None


def onednn_unavailable(device: str, dtype: torch.dtype) -> str | None:
    """Why oneDNN packing cannot run for `dtype` on `device`; None when it can (a probe reorder)."""
    if torch.device(device).type != "cpu":
        return f"it is a CPU path; on {device} use auto or torch"
    if not torch.backends.mkldnn.is_available():
        return "this torch build has no oneDNN (mkldnn)"
    try:
        torch.ops.mkldnn._reorder_linear_weight(torch.zeros(8, 8, dtype=dtype), 1)
    except RuntimeError as exc:  # bfloat16 without AVX-512 / AVX-NE-CONVERT
        return f"oneDNN cannot pack {str(dtype).split('.')[-1]} weights on this CPU ({str(exc).splitlines()[0]})"
    return None


def resolve_linear_kernel(choice: str, device: str, dtype: torch.dtype, compiled: bool) -> str:
    """What EngineConfig.linear_kernel `choice` means here: auto is gguf on a CPU that packs `dtype` when
    it is float32 and Helios's CPU kernels build, else onednn there, unless the layers are compiled
    (compile_layers traces the plain nn.Linear path), else torch."""
    why_not = onednn_unavailable(device, dtype)
    if choice == "auto":
        if why_not is not None or compiled:
            return "torch"
        return "gguf" if dtype == torch.float32 and gguf_pack_op() is not None else "onednn"
    if choice in ("onednn", "gguf"):
        if why_not:
            raise ValueError(f"linear_kernel {choice!r}: {why_not}")
        if compiled:
            raise ValueError(f"linear_kernel {choice!r} and compile_layers exclude each other; use auto or torch")
    if choice == "gguf":
        if dtype != torch.float32:
            raise ValueError(f"linear_kernel 'gguf' computes in float32; this model runs in {str(dtype).split('.')[-1]}")
        if gguf_pack_op() is None:
            raise RuntimeError(f"linear_kernel 'gguf': Helios's CPU kernels could not be built ({build_error()}); "
                               "use auto or onednn")
    return choice


def pack_linears(model: nn.Module, rows_hint: int, kernel: str = "onednn") -> tuple[int, int]:
    """Swap every nn.Linear of the decoder layers, and the LM head, for a PackedLinear; returns how many,
    and how many of them run GGUF blocks (kernel `gguf`: for calls of at most GGUF_BLOCK_ROWS rows).

    `rows_hint`: the rows a call usually has (the engine's max_num_seqs); any row count works.
    Memory: the layers' plain weights are freed, so they cost the same; the LM head keeps its plain
    weight, so packing costs one more copy of it (113 MB for SmolLM2 in float32). GGUF blocks add
    their own bytes: 5-8.5 bits a weight (106 MB for SmolLM2's Q4_1 layers and Q8_0 head)."""
    block_rows = GGUF_BLOCK_ROWS if kernel == "gguf" else 0
    swapped = blocked = 0
    for parent in [*model.layers, model]:
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                packed = PackedLinear(child, rows_hint, keep_weight=child is model.lm_head, block_rows=block_rows)
                setattr(parent, name, packed)
                swapped += 1
                blocked += packed.block_rows > 0
    return swapped, blocked
