"""Paged attention of one step: decode rows by context-length group, prefill chunks one by one.

Rows of a step are laid out as [decode rows, shortest context first | prefill chunk rows].
Decode rows attend in groups of similar context length, each group over its own longest
context: the K/V gather is the larger part of decode attention here, and with contexts of
mixed length a third of it was padding. A sliding-window layer (Gemma 3's local layers)
attends to the last `window` positions only, the query's own included.

Positions here count from the first block of the block tables the metadata holds. For the
full layers that is position 0; the window layers read their own cache through window tables
that start where the window does (older blocks were freed, helios/block_manager.py), so the
runner shifts their context lengths and chunk starts by the dropped blocks. The masks are
relative (causal, and the window), and RoPE is already in the cached keys, so the shift
changes no result: attention needs no offset of its own.

Decode kernels (`AttentionMetadata.decode_kernel`, EngineConfig.decode_kernel): `paged` (the
default on CPU) reads each row's K/V from the cache in place, through its block table, in one
C++ kernel (helios/csrc/paged_decode.cpp, float32 scores and an exact softmax); `sdpa` (the
default elsewhere) and `matmul` first gather each (row, kv head) context into one contiguous
matrix (the cache is kv-head-major), then hand it to scaled_dot_product_attention, or to two
batched matmuls around a float32 softmax. The gather copies every row's context per layer
per step: in a batch-64 decode step A/B on a 2-core CPU (bench/decode_step_ab.py,
bench/results/README.md) `paged` made the whole step 1.3-1.7x faster than `sdpa`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from helios.cpu_kernels import build_error, paged_decode_op
from helios.kv_cache import KVCache


DECODE_KERNELS = ("paged", "sdpa", "matmul")


@dataclass
class PrefillChunk:
    start: int  # first row of the chunk in the step
    end: int
    blocks: torch.Tensor  # the sequence's block table up to the chunk's end
    ctx_start: int  # position of the chunk's first token (counted from the table's first block)
    ctx_len: int  # positions attended: 0 .. ctx_len-1 (idem)


@dataclass
class AttentionMetadata:
    num_decode: int  # rows 0..num_decode-1 are single-token decodes
    decode_blocks: torch.Tensor  # [num_decode, max_blocks] block tables (padded with 0)
    decode_mask: torch.Tensor  # [num_decode, max_blocks * block_size] valid context
    decode_groups: list[tuple[int, int, int]]  # (row start, row end, blocks): decode rows by context length
    prefill: list[PrefillChunk]
    decode_ctx_lens: torch.Tensor | None = None  # [num_decode] context length of each row, from its table's start
    decode_kernel: str = "sdpa"  # one of DECODE_KERNELS
    _window_masks: dict = field(default_factory=dict)

    def decode_mask_for(self, window: int | None) -> torch.Tensor:
        """The decode mask of a layer that sees the last `window` positions (None: all); built once per step."""
        if window is None:
            return self.decode_mask
        if window not in self._window_masks:
            positions = torch.arange(self.decode_mask.shape[1], device=self.decode_mask.device)
            recent = positions[None, :] >= (self.decode_ctx_lens[:, None] - window)
            self._window_masks[window] = self.decode_mask & recent
        return self._window_masks[window]


def decode_groups(num_blocks: list[int], min_rows: int = 16, max_groups: int = 4) -> list[tuple[int, int, int]]:
    """Split decode rows (sorted by context) into groups of at least `min_rows` rows, each over its
    widest table (window tables are not sorted with the context: their length cycles within a block)."""
    count = len(num_blocks)
    groups = max(1, min(max_groups, count // min_rows))
    bounds = [round(i * count / groups) for i in range(groups + 1)]
    return [(start, end, max(num_blocks[start:end])) for start, end in zip(bounds, bounds[1:]) if end > start]


def attention(cache: KVCache, layer: int, q: torch.Tensor, meta: AttentionMetadata,
              decode_rows: torch.Tensor | None, window: int | None = None) -> torch.Tensor:
    """Attention output [T, H*D] for q [T, H, D]; decode rows only where `decode_rows` (None = all) say;
    `window`: the layer attends to the last `window` positions only."""
    decode = _decode_attention(cache, layer, q, meta, decode_rows, window)
    if decode is not None and decode_rows is None and not meta.prefill:
        return decode  # a decode-only step with every row running: no scatter into a buffer
    out = torch.zeros(q.shape[0], q.shape[1] * q.shape[2], dtype=q.dtype, device=q.device)
    if decode is not None:
        out[slice(0, meta.num_decode) if decode_rows is None else decode_rows] = decode
    for chunk in meta.prefill:
        out[chunk.start:chunk.end] = _prefill_attention(cache, layer, q[chunk.start:chunk.end], chunk, window)
    return out


def _prefill_attention(cache: KVCache, layer: int, q: torch.Tensor, chunk: PrefillChunk,
                       window: int | None) -> torch.Tensor:
    k, v = cache.gather(layer, chunk.blocks[None])
    k, v = k[:, :, :chunk.ctx_len], v[:, :, :chunk.ctx_len]
    qs = q.transpose(0, 1)[None]
    if chunk.ctx_start == 0 and (window is None or window >= chunk.ctx_len):
        o = F.scaled_dot_product_attention(qs, k, v, is_causal=True, enable_gqa=True)
    else:
        q_pos = torch.arange(chunk.ctx_start, chunk.ctx_len, device=q.device)[:, None]
        k_pos = torch.arange(chunk.ctx_len, device=q.device)[None, :]
        mask = k_pos <= q_pos
        if window is not None:
            mask &= k_pos > q_pos - window
        o = F.scaled_dot_product_attention(qs, k, v, attn_mask=mask, enable_gqa=True)
    return o[0].transpose(0, 1).reshape(len(q), -1)


def _decode_attention(cache: KVCache, layer: int, q: torch.Tensor, meta: AttentionMetadata,
                      rows: torch.Tensor | None, window: int | None) -> torch.Tensor | None:
    """[R, H*D] for the decode rows `rows` (ascending; None = all), one length group at a time;
    None if there are no such rows."""
    if meta.decode_kernel == "paged":  # every row over its own context: no groups, no masks
        if not meta.num_decode or (rows is not None and not len(rows)):
            return None
        picked = slice(0, meta.num_decode) if rows is None else rows
        return _paged_decode(cache, layer, q[picked], meta.decode_blocks[picked], meta.decode_ctx_lens[picked],
                             window)
    span, outs, mask = cache.block_size, [], meta.decode_mask_for(window)
    for start, end, blocks in meta.decode_groups:
        picked = slice(start, end) if rows is None else rows[(rows >= start) & (rows < end)]
        if rows is None or len(picked):  # slices for all rows: views, not index copies
            kernel = _matmul_decode if meta.decode_kernel == "matmul" else _sdpa_decode
            outs.append(kernel(cache, layer, q[picked], meta.decode_blocks[picked, :blocks],
                               mask[picked, :blocks * span]))
    return None if not outs else outs[0] if len(outs) == 1 else torch.cat(outs)


def _paged_decode(cache: KVCache, layer: int, q: torch.Tensor, blocks: torch.Tensor, ctx_lens: torch.Tensor,
                  window: int | None) -> torch.Tensor:
    """One-token attention of rows q [R, H, D] read from the cache in place (helios/csrc): [R, H*D]."""
    op = paged_decode_op()
    if op is None:
        raise RuntimeError(f"the paged decode kernel could not be built: {build_error()}")
    return op(q.contiguous(), cache.k[layer], cache.v[layer], blocks, ctx_lens, window or 0, q.shape[-1] ** -0.5)


def _matmul_decode(cache: KVCache, layer: int, q: torch.Tensor, blocks: torch.Tensor,
                   mask: torch.Tensor) -> torch.Tensor:
    """One-token attention of rows q [R, H, D] over their block tables: [R, H*D], by two batched matmuls."""
    k, v = cache.gather_heads(layer, blocks)  # [Hkv, R, L, D], contiguous
    heads, rows, length, dim = k.shape
    # a kv head's query heads are the query rows of one [group x context] problem per (kv head, row)
    grouped = q.view(rows, heads, -1, dim).transpose(0, 1).reshape(heads * rows, -1, dim)
    # scores in float32 from float32 operands, as SDPA's kernel keeps them: bf16 scores (transformers'
    # eager path) were 12x further from a float64 reference than SDPA where attention is peaked
    scores = torch.bmm(grouped.float(), k.view(heads * rows, length, dim).transpose(1, 2).float()) * dim**-0.5
    scores = scores.view(heads, rows, -1, length).masked_fill_(~mask[None, :, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(q.dtype).view(heads * rows, -1, length)
    out = torch.bmm(probs, v.view(heads * rows, length, dim))  # [Hkv*R, group, D]
    return out.view(heads, rows, -1).transpose(0, 1).reshape(rows, -1)


def _sdpa_decode(cache: KVCache, layer: int, q: torch.Tensor, blocks: torch.Tensor,
                 mask: torch.Tensor) -> torch.Tensor:
    """One-token attention of rows q [R, H, D] over their block tables: [R, H*D]."""
    k, v = cache.gather(layer, blocks)
    # A kv head's query heads become its query rows: SDPA then sees no GQA and one
    # [group x context] problem per (row, kv head), several times faster on CPU than a
    # one-row query with enable_gqa. Query head h reads kv head h // group.
    grouped = q.view(len(q), k.shape[1], -1, q.shape[2])
    return F.scaled_dot_product_attention(grouped, k, v, attn_mask=mask[:, None, None, :]).reshape(len(q), -1)
