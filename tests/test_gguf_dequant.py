"""Helios's torch dequantizers give gguf's reference values bit for bit."""

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import dequantize as gguf_dequantize

from helios.gguf_dequant import dequantize


def random_blocks(kind: gguf.GGMLQuantizationType, rows: int, blocks_per_row: int, seed: int = 0) -> np.ndarray:
    """Raw rows as gguf's reader presents them: uint8 [rows, bytes], each block a finite float16
    scale (some negative, some zero) followed by random bytes (for Q4_1, a float16 minimum drawn
    the same way, then the nibbles)."""
    rng = np.random.default_rng(seed)
    block_bytes = gguf.GGML_QUANT_SIZES[kind][1]
    raw = rng.integers(0, 256, size=(rows, blocks_per_row, block_bytes), dtype=np.uint8)
    scales = rng.normal(0, 0.05, size=(rows, blocks_per_row)).astype(np.float16)
    scales[0, 0] = 0
    raw[..., :2] = scales[..., None].view(np.uint8).reshape(rows, blocks_per_row, 2)
    if kind == gguf.GGMLQuantizationType.Q4_1:
        minimums = rng.normal(0, 0.1, size=(rows, blocks_per_row)).astype(np.float16)
        raw[..., 2:4] = minimums[..., None].view(np.uint8).reshape(rows, blocks_per_row, 2)
    return raw.reshape(rows, blocks_per_row * block_bytes)


@pytest.mark.parametrize("kind", [gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q5_0,
                                  gguf.GGMLQuantizationType.Q4_1])
def test_torch_kernels_match_gguf(kind):
    raw = random_blocks(kind, rows=24, blocks_per_row=5)
    ours = dequantize(raw, kind)
    reference = torch.from_numpy(np.ascontiguousarray(gguf_dequantize(raw, kind), dtype=np.float32))
    assert ours.dtype == torch.float32 and ours.shape == (24, 5 * 32)
    assert torch.equal(ours, reference)


def test_other_types_go_through_gguf():
    kind = gguf.GGMLQuantizationType.Q4_0
    raw = random_blocks(kind, rows=3, blocks_per_row=2)
    ours = dequantize(raw, kind)
    assert ours.dtype == torch.float32 and torch.equal(ours, torch.from_numpy(gguf_dequantize(raw, kind)))
    values = np.arange(12, dtype=np.float16).reshape(3, 4)
    assert torch.equal(dequantize(values, gguf.GGMLQuantizationType.F16), torch.arange(12.0).reshape(3, 4))
