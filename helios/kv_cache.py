"""Paged K/V storage for the loaded layers: fixed-size blocks, written by slot, read by block table."""

from __future__ import annotations

import torch


def slot_mapping(block_table: list[int], block_size: int, start: int, end: int) -> list[int]:
    """Flat cache slot of each token position in [start, end) of a sequence with `block_table`."""
    return [block_table[p // block_size] * block_size + p % block_size for p in range(start, end)]


class KVCache:
    """K and V as [layers, blocks, block_size, kv_heads, head_dim]; a block holds `block_size` tokens."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        shape = (num_layers, num_blocks, block_size, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.block_size = block_size

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """K/V rows [T, kv_heads, head_dim] into their slots of `layer`."""
        self.k[layer].view(-1, *k.shape[1:]).index_copy_(0, slots, k)
        self.v[layer].view(-1, *v.shape[1:]).index_copy_(0, slots, v)

    def gather(self, layer: int, block_tables: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V of whole blocks [B, kv_heads, blocks * block_size, head_dim] for block tables [B, blocks]."""
        b, n = block_tables.shape
        flat = block_tables.flatten()
        k, v = self.k[layer].index_select(0, flat), self.v[layer].index_select(0, flat)
        shape = (b, n * self.block_size, *k.shape[2:])
        return k.view(shape).transpose(1, 2), v.view(shape).transpose(1, 2)
