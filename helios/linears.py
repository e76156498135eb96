"""Linear layers over oneDNN's prepacked weights (`linear_kernel: onednn`), for CPU decode.

Why: at decode's few rows per step, `nn.Linear` (MKL's sgemm on the plain [out, in] weight) is
well below what the CPU can do, and oneDNN on a weight reordered once into its blocked layout
(what inductor's freezing does for CPU linears) is not. Measured on a 2-core AMD EPYC (AVX2,
float32, weights of 30 SmolLM2 layers cycled so that they come from memory as in a real step):
the layers' projections at 32 rows 104 -> 77 ms, the 49,152-word LM head 35 -> 18 ms; at one row
40 -> 31 and 10 -> 7 ms. From 128 rows up (prefill) the two run at the same speed. Same float32
arithmetic: error against a float64 reference 2.5-5e-7 against MKL's 3.3-8.6e-7.
bench/results/README.md has the whole-step figures.

`torch.ops.mkldnn._reorder_linear_weight` / `_linear_pointwise` are the ops inductor emits for
that. They have no autograd, and bfloat16 needs AVX-512 or AVX-NE-CONVERT, so `auto` packs only
where a probe reorder succeeds. Code that reads a projection's plain weight (bench/head_forms.py)
asks for `torch`; the LM head keeps its plain weight for ee-tune and the exit-head tools.
"""

from __future__ import annotations

import torch
from torch import nn


class PackedLinear(nn.Module):
    """`nn.Linear`'s forward over a weight reordered once for oneDNN. The packed weight is a buffer,
    so a model's buffer bytes count it. `keep_weight` keeps the plain weight too, under `weight`:
    the LM head's, which ee-tune and the exit-head tools read (for a tied head it is the
    embedding's own tensor, so keeping it costs nothing)."""

    def __init__(self, linear: nn.Linear, rows_hint: int, keep_weight: bool = False):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), rows_hint)
        self.register_buffer("packed", packed, persistent=False)
        self.bias = linear.bias
        if keep_weight:
            self.weight = linear.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


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
    """What EngineConfig.linear_kernel `choice` means here: auto is onednn on a CPU that packs `dtype`,
    unless the layers are compiled (compile_layers traces the plain nn.Linear path), else torch."""
    why_not = onednn_unavailable(device, dtype)
    if choice == "auto":
        return "onednn" if why_not is None and not compiled else "torch"
    if choice == "onednn":
        if why_not:
            raise ValueError(f"linear_kernel 'onednn': {why_not}")
        if compiled:
            raise ValueError("linear_kernel 'onednn' and compile_layers exclude each other; use auto or torch")
    return choice


def pack_linears(model: nn.Module, rows_hint: int) -> int:
    """Swap every nn.Linear of the decoder layers, and the LM head, for a PackedLinear; returns how many.

    `rows_hint`: the rows a call usually has (the engine's max_num_seqs); any row count works.
    Memory: the layers' plain weights are freed, so they cost the same; the LM head keeps its plain
    weight, so packing costs one more copy of it (113 MB for SmolLM2 in float32)."""
    swapped = 0
    for parent in [*model.layers, model]:
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, PackedLinear(child, rows_hint, keep_weight=child is model.lm_head))
                swapped += 1
    return swapped
