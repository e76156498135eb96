"""Q4_K and Q6_K blocks written by hand from llama.cpp's layout (ggml-common.h).

The `gguf` package dequantizes K-quants but cannot quantize them, so the tests pack the
blocks here. Each encoder returns the packed bytes and the values they stand for, computed
from the integer codes and scales directly (not by unpacking), so a test can check that a
reader's dequantization and these values agree.
"""

from __future__ import annotations

import numpy as np

QK_K = 256  # values per super-block


def _f16(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float16 bytes of `values` [n] and the float32 values they hold."""
    half = values.astype(np.float16)
    return half.reshape(-1, 1).view(np.uint8), half.astype(np.float32)


def quantize_q4_k(weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K: per super-block d, dmin (f16), 8 sub-blocks of 32 with 6-bit scale and min codes,
    4-bit values; value = d*sc*q - dmin*m. Returns (bytes [rows, 144*k], values [rows, cols])."""
    rows, cols = weights.shape
    x = weights.reshape(-1, 8, 32).astype(np.float32)  # [blocks, sub-block, value]
    low = np.minimum(x.min(-1), 0)
    scale = (x.max(-1) - low) / 15  # [blocks, 8]
    d_bytes, d = _f16(np.maximum(scale.max(-1), 1e-8) / 63)
    dmin_bytes, dmin = _f16(np.maximum(-low.min(-1), 1e-8) / 63)
    sc = np.clip(np.round(scale / d[:, None]), 1, 63).astype(np.uint8)
    m = np.clip(np.round(-low / dmin[:, None]), 0, 63).astype(np.uint8)
    step, offset = (d[:, None] * sc)[..., None], (dmin[:, None] * m)[..., None]
    q = np.clip(np.round((x + offset) / step), 0, 15).astype(np.uint8)
    values = step * q - offset
    scales = np.concatenate([sc[:, :4] | ((sc[:, 4:] >> 4) << 6),  # 6 low bits of scales 0-3, high bits of 4-7
                             m[:, :4] | ((m[:, 4:] >> 4) << 6),  # the same for the mins
                             (sc[:, 4:] & 0x0F) | ((m[:, 4:] & 0x0F) << 4)], axis=1)  # low nibbles of 4-7
    qs = (q[:, 0::2] | (q[:, 1::2] << 4)).reshape(-1, 128)  # byte g*32+l: sub-block 2g (low), 2g+1 (high)
    blocks = np.concatenate([d_bytes, dmin_bytes, scales, qs], axis=1)
    return blocks.reshape(rows, -1), values.reshape(rows, cols)


def quantize_q6_k(weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q6_K: 16 sub-blocks of 16 with an int8 scale each, one f16 d, 6-bit values stored as
    4 low bits (ql) and 2 high bits (qh); value = d*scale*(q - 32).
    Returns (bytes [rows, 210*k], values [rows, cols])."""
    rows, cols = weights.shape
    x = weights.reshape(-1, 16, 16).astype(np.float32)
    scale = np.abs(x).max(-1) / 31  # [blocks, 16]
    d_bytes, d = _f16(np.maximum(np.abs(scale).max(-1), 1e-8) / 127)
    sc = np.clip(np.round(scale / d[:, None]), 1, 127).astype(np.int8)
    step = (d[:, None] * sc)[..., None]
    q = np.clip(np.round(x / step) + 32, 0, 63).astype(np.uint8).reshape(-1, 2, 128)  # two halves of 128
    values = (step * (q.reshape(-1, 16, 16).astype(np.float32) - 32))
    low, high = q & 0x0F, q >> 4
    ql = (low[:, :, :64] | (low[:, :, 64:] << 4)).reshape(-1, 128)  # byte h*64+l: positions l, l+64 of half h
    qh = (high[:, :, 0:32] | (high[:, :, 32:64] << 2) | (high[:, :, 64:96] << 4) | (high[:, :, 96:] << 6))
    blocks = np.concatenate([ql, qh.reshape(-1, 64), sc.view(np.uint8), d_bytes], axis=1)
    return blocks.reshape(rows, -1), values.reshape(rows, cols)
