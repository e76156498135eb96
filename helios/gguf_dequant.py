"""GGUF blocks -> float32 tensors: Q8_0, Q5_0 and Q4_1 in torch, every other type through gguf's numpy.

gguf's reference dequantizers are numpy loops over groups of rows. For Q8_0 and Q5_0 they are
the slow part of a load: measured on a 2-core CPU, Qwen2.5-0.5B's 137M Q8_0 and 388M Q5_0
values took 10.9 s and 11.0 s (Gemma 3 270M's Q8_0 embeddings 14.8 s, SmolLM2's 2.2 s), most of
a cached load; Q4_1 (SmolLM2's layers) took 0.7 s of a 1.5-3 s depth change. The same
arithmetic over whole tensors in torch takes a fraction of that (see bench/results/README.md,
"Model loads"); tests hold it to gguf's output bit for bit. K-quants are left to gguf: they
measured under 0.4 s per model.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

BLOCK = 32  # values per Q8_0 / Q5_0 / Q4_1 block
Q8_0_BYTES = 2 + 32  # float16 scale, 32 int8
Q5_0_BYTES = 2 + 4 + 16  # float16 scale, 32 high bits, 32 low nibbles
Q4_1_BYTES = 2 + 2 + 16  # float16 scale, float16 minimum, 32 nibbles


def dequantize(raw: np.ndarray, quant_type: Any) -> torch.Tensor:
    """The float32 values of a GGUF tensor's raw array (as gguf's reader presents it)."""
    if quant_type.name not in _TORCH_KERNELS:
        from gguf.quants import dequantize as gguf_dequantize

        return torch.from_numpy(np.array(gguf_dequantize(raw, quant_type), dtype=np.float32, copy=True))
    kernel, block_bytes = _TORCH_KERNELS[quant_type.name]
    # a copy of the packed bytes (a quarter of the values' size): the file's pages are mapped read-only
    blocks = torch.from_numpy(np.array(raw, copy=True)).reshape(-1, block_bytes)
    return kernel(blocks).reshape(*raw.shape[:-1], -1)


def _scales(blocks: torch.Tensor) -> torch.Tensor:
    return blocks[:, :2].contiguous().view(torch.float16).to(torch.float32)  # [blocks, 1]


def _q8_0(blocks: torch.Tensor) -> torch.Tensor:
    values = blocks[:, 2:].contiguous().view(torch.int8).to(torch.float32)
    return _scales(blocks) * values


_BIT_SHIFTS = torch.arange(8, dtype=torch.uint8)


def _q5_0(blocks: torch.Tensor) -> torch.Tensor:
    # bit j of the little-endian 32-bit word (byte j // 8, bit j % 8) is value j's fifth bit
    fifth_bits = ((blocks[:, 2:6, None] >> _BIT_SHIFTS) & 1).reshape(-1, BLOCK) << 4
    nibbles = blocks[:, 6:]
    low = torch.cat([nibbles & 0x0F, nibbles >> 4], dim=1)  # values 0-15, then 16-31
    return _scales(blocks) * ((low | fifth_bits).to(torch.float32) - 16)


def _q4_1(blocks: torch.Tensor) -> torch.Tensor:
    minimum = blocks[:, 2:4].contiguous().view(torch.float16).to(torch.float32)
    nibbles = blocks[:, 4:]
    values = torch.cat([nibbles & 0x0F, nibbles >> 4], dim=1).to(torch.float32)  # values 0-15, then 16-31
    return _scales(blocks) * values + minimum


_TORCH_KERNELS = {"Q8_0": (_q8_0, Q8_0_BYTES), "Q5_0": (_q5_0, Q5_0_BYTES), "Q4_1": (_q4_1, Q4_1_BYTES)}
