"""Fixed-size KV blocks with a free list and per-sequence block tables, and the KV memory sizing.

Two pools when the loaded layers mix sliding-window and full-attention layers (Gemma 3): the
full layers keep every position (`BlockManager`, `Sequence.block_table`), while the window
layers keep only the blocks a future query can still see (`WindowBlockManager`,
`Sequence.window_table`): the blocks that fall out of the window go back to the free list
after each step. Without window layers there is one pool, as before.

No torch here: the controller sizes a replica's KV cache with the same functions.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence as Seq
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from helios.sequence import Sequence


def kv_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype_bytes: int) -> int:
    """K and V of one token across the loaded layers."""
    return 2 * num_layers * num_kv_heads * head_dim * dtype_bytes


def num_blocks_for_budget(budget_bytes: int, block_size: int, bytes_per_token: int) -> int:
    """How many blocks a memory budget holds: halve the loaded layers, double the blocks."""
    return budget_bytes // (block_size * bytes_per_token)


def split_layers(layer_windows: Seq[int | None]) -> tuple[list[int], list[int]]:
    """(full-attention layers, window layers) by index. A window pool pays only beside full layers:
    when all layers are alike, every layer is in the first list (one pool, nothing freed early)."""
    full = [i for i, w in enumerate(layer_windows) if w is None]
    window = [i for i, w in enumerate(layer_windows) if w is not None]
    return (full, window) if full and window else (list(range(len(layer_windows))), [])


def window_span(window: int, chunk: int, block_size: int) -> int:
    """Most window blocks one sequence holds in a step computing `chunk` of its tokens: the keys
    of the `window - 1` positions before the chunk and the chunk's own, plus one block for where
    the window starts and ends inside a block."""
    return -(-(window + chunk) // block_size) + 1


class PoolBlocks(NamedTuple):
    blocks: int  # full-attention pool (the only pool without window layers)
    window_blocks: int  # window pool; 0: none


def kv_pool_blocks(budget_bytes: int, block_size: int, layer_bytes_per_token: int, layer_windows: Seq[int | None],
                   num_seqs: int = 0, step_tokens: int = 0) -> PoolBlocks:
    """Blocks of each pool a budget holds; `num_seqs` (sequences holding KV at once) and `step_tokens`
    (tokens per step at most) size the window pool and matter only with window layers.

    The window pool gets what every sequence needs for a full window in the same step, and the
    full pool the rest: that is where a long context gains. A budget too small for that is split
    so that both pools hold the same tokens (a sequence never holds more window blocks than full
    ones, so more would be wasted), which equals the one-pool capacity."""
    full, window = split_layers(layer_windows)
    full_bytes = block_size * layer_bytes_per_token * len(full)
    if not window:
        return PoolBlocks(budget_bytes // full_bytes, 0)
    widest = max(w for w in layer_windows if w is not None)
    # a sequence computing C tokens holds at most (W + C - 3) // block_size + 2 window blocks;
    # summed over the sequences, with at most `step_tokens` C's in a step:
    demand = num_seqs * (-(-widest // block_size) + 2) + -(-step_tokens // block_size)
    equal = budget_bytes // (full_bytes + block_size * layer_bytes_per_token * len(window))
    if demand >= equal:
        return PoolBlocks(equal, equal)
    return PoolBlocks((budget_bytes - demand * block_size * layer_bytes_per_token * len(window)) // full_bytes,
                      demand)


class BlockManager:
    """The pool of full-attention layers: a sequence's table holds its logical blocks 0, 1, 2, ..."""

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1:
            raise ValueError("the KV-cache budget holds no block: raise kv_cache_memory")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.free_blocks: deque[int] = deque(range(num_blocks))

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks that hold `num_tokens` tokens."""
        return -(-num_tokens // self.block_size)

    def table(self, seq: Sequence) -> list[int]:
        return seq.block_table

    def first_block(self, seq: Sequence) -> int:
        """Logical block of the table's first entry."""
        return 0

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """Extra blocks `seq` needs to hold `num_tokens` tokens."""
        return max(0, self.blocks_for(num_tokens) - self.first_block(seq) - len(self.table(seq)))

    def can_grow(self, seq: Sequence, num_tokens: int) -> bool:
        return self.blocks_needed(seq, num_tokens) <= len(self.free_blocks)

    def grow(self, seq: Sequence, num_tokens: int) -> None:
        table = self.table(seq)
        for _ in range(self.blocks_needed(seq, num_tokens)):
            table.append(self.free_blocks.popleft())

    def free(self, seq: Sequence) -> None:
        self.free_blocks.extend(seq.block_table)
        seq.block_table = []

    @property
    def usage(self) -> float:
        return 1.0 - len(self.free_blocks) / self.num_blocks


class WindowBlockManager(BlockManager):
    """The pool of sliding-window layers: `seq.window_table[i]` holds logical block
    `seq.window_dropped + i`; the blocks before it fell out of the window and were freed."""

    def __init__(self, num_blocks: int, block_size: int, window: int):
        super().__init__(num_blocks, block_size)
        self.window = window  # the widest window of the pool's layers

    def table(self, seq: Sequence) -> list[int]:
        return seq.window_table

    def first_block(self, seq: Sequence) -> int:
        return seq.window_dropped

    def drop_old(self, seq: Sequence) -> None:
        """Free the blocks no future query of `seq` can see. Queries come at positions >= n (its
        computed tokens) and a query at p sees p - window + 1 .. p, so logical block b can go
        once (b + 1) * block_size <= n - window + 1."""
        gone = max(0, (seq.num_computed_tokens - self.window + 1) // self.block_size - seq.window_dropped)
        if gone:
            self.free_blocks.extend(seq.window_table[:gone])
            del seq.window_table[:gone]
            seq.window_dropped += gone

    def reserve(self, seq: Sequence, num_tokens: int) -> int:
        """Extra blocks `seq` will hold at most while decoding up to `num_tokens` tokens."""
        return max(0, min(self.blocks_for(num_tokens), window_span(self.window, 1, self.block_size))
                   - len(seq.window_table))

    def free(self, seq: Sequence) -> None:
        self.free_blocks.extend(seq.window_table)
        seq.window_table, seq.window_dropped = [], 0
