"""Paged K/V storage for the loaded layers: fixed-size blocks, written by slot, read by block table.

Layout [layers, kv_heads, blocks, block_size, head_dim] (kv head outermost): gathering a
batch's blocks gives each (kv head, row) its context as one contiguous [context, head_dim]
matrix, which batched matmuls read as they are (decode attention); with the kv head inside
the block, every (row, kv head) matrix came out strided and attention copied it again.

A model that mixes sliding-window and full-attention layers (Gemma 3) has two caches, each
holding only its own layers: the full layers' cache is read through a sequence's block table
(logical blocks 0, 1, ...), the window layers' through its window table, which starts at the
first block still inside the window (`first_block`): older blocks were freed and reused.
"""

from __future__ import annotations

import torch


def slot_mapping(block_table: list[int], block_size: int, start: int, end: int, first_block: int = 0) -> list[int]:
    """Flat cache slot of each token position in [start, end) of a sequence whose `block_table`
    holds logical blocks `first_block`, `first_block + 1`, ..."""
    return [block_table[p // block_size - first_block] * block_size + p % block_size for p in range(start, end)]


class KVCache:
    """K and V as [layers, kv_heads, blocks, block_size, head_dim]; a block holds `block_size` tokens."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        shape = (num_layers, num_kv_heads, num_blocks, block_size, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.block_size = block_size

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """K/V rows [T, kv_heads, head_dim] into their slots of `layer`."""
        heads, dim = k.shape[1:]
        self.k[layer].view(heads, -1, dim).index_copy_(1, slots, k.transpose(0, 1))
        self.v[layer].view(heads, -1, dim).index_copy_(1, slots, v.transpose(0, 1))

    def gather_heads(self, layer: int, block_tables: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V of whole blocks [kv_heads, B, blocks * block_size, head_dim], contiguous, for tables [B, blocks]."""
        b, n = block_tables.shape
        flat = block_tables.flatten()
        k, v = self.k[layer].index_select(1, flat), self.v[layer].index_select(1, flat)
        shape = (k.shape[0], b, n * self.block_size, k.shape[-1])
        return k.view(shape), v.view(shape)

    def gather(self, layer: int, block_tables: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V of whole blocks [B, kv_heads, blocks * block_size, head_dim] (a strided view) for tables [B, blocks]."""
        k, v = self.gather_heads(layer, block_tables)
        return k.transpose(0, 1), v.transpose(0, 1)
