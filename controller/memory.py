"""What a replica memory budget holds at a depth: the prefix's weights, then KV blocks.

Fewer layers free weight bytes and shrink each token's K/V, so the same budget holds more
sequences; HELIOS's larger batches come from here. The block arithmetic is the engine's own
(helios/block_manager.py: kv_pool_blocks, torch-free). A profile records no sliding windows, so
this counts every layer in one pool: for a model with window layers (Gemma 3) the engine's
full-attention pool holds at least as many tokens as this says.
"""

from __future__ import annotations

import dataclasses

from controller.repository import CandidateProfile
from helios.block_manager import kv_pool_blocks
from helios.config import EngineConfig


def kv_cache_bytes(profile: CandidateProfile, depth: int, budget: int) -> int:
    """Bytes left for K/V once the first `depth` layers' weights are loaded (0 when they do not fit)."""
    return max(0, budget - profile.weight_bytes(depth))


def prefix_engine(engine: EngineConfig, profile: CandidateProfile, depth: int, budget: int) -> EngineConfig:
    """`engine` loading the first `depth` layers, with the KV cache the budget leaves after them."""
    return dataclasses.replace(engine, max_layers=depth, kv_cache_memory=kv_cache_bytes(profile, depth, budget))


def blocks_held(profile: CandidateProfile, depth: int, budget: int, block_size: int = 16) -> int:
    return kv_pool_blocks(kv_cache_bytes(profile, depth, budget), block_size, profile.kv_bytes_per_token_per_layer,
                          [None] * depth).blocks


def sequences_held(profile: CandidateProfile, depth: int, budget: int, tokens_per_sequence: int,
                   block_size: int = 16) -> int:
    """Sequences of `tokens_per_sequence` tokens whose K/V fit at once."""
    blocks_per_sequence = -(-tokens_per_sequence // block_size)
    return blocks_held(profile, depth, budget, block_size) // blocks_per_sequence
