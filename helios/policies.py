"""Length-aware scheduling policies behind the scheduler's `SchedulingPolicy` seam.

`spf` — shortest predicted first, with aging. A waiting sequence's key is

    key = predicted_length - aging * waited = predicted_length + aging * arrival_time - aging * now

(smaller is admitted first; `aging * now` is common to all, so the order uses
predicted_length + aging * arrival_time)

with `predicted_length` from the length head (helios/length.py), made in the sequence's
prefill. A sequence not yet prefilled has no prediction and counts as `unknown_length`
(default 0: new work is prefilled first, which gives it its first token and its
prediction). Sequences that were preempted come back first, as under FCFS.

Starvation bound: the key depends only on the sequence itself, so the order of two
sequences never changes while they wait. A sequence S with prediction p that arrived at
time t is admitted before every sequence that arrives after t + (p - p_min) / aging
(p_min = the smallest key length, 0 with the default `unknown_length`): only sequences
that arrive within p / aging seconds after S can overtake it. With aging = 20 tokens/s
and a 512-token cap that window is 25.6 s. aging = 0 is pure SPF (long work can starve).

Fresh arrivals have no prediction until their prefill ran, so `spf` admits up to
`lookahead` sequences beyond `max_num_seqs`: they are prefilled at once (first token and
prediction), and every step the `max_num_seqs` prefilled sequences with the smallest

    decode key = predicted_remaining + aging * arrival_time

decode while the rest are parked with their KV blocks (shortest remaining work first: a
long answer already decoding yields its slot to a shorter newcomer, and takes it back
without recomputation). The same bound holds for a parked sequence: its key is fixed while
it is parked, so only arrivals within remaining / aging seconds after it can overtake it
(a sequence that outran its prediction counts as many tokens again as it made, so its
bound is at most max_tokens / aging). Without a length head every key is
`unknown_length + aging * arrival_time`, i.e. arrival order.

Preemption victim: the sequence with the longest predicted remaining work
(predicted - generated; `max_tokens` when there is no prediction), the latest admitted on ties.

`spf-reserve` — spf, and a sequence is admitted only when the KV blocks that it and every
running sequence are predicted to need still fit: reserving from predictions avoids
admitting work that will later be preempted for memory. A sequence without a prediction
reserves its prompt plus `min(max_tokens, unknown_reserve)` tokens; one that outran its
prediction reserves one more block. A model with a sliding-window pool reserves there too: at
most a window's blocks per sequence, since older ones are freed as it decodes.
"""

from __future__ import annotations

from collections import deque
from typing import Iterator

from helios.block_manager import BlockManager, WindowBlockManager
from helios.scheduler import FCFSPolicy, SchedulingPolicy
from helios.sequence import Sequence

DEFAULT_AGING = 20.0  # tokens of predicted length forgiven per second waited
DEFAULT_LOOKAHEAD = 64  # sequences prefilled beyond max_num_seqs so that they can be ranked


def remaining_work(seq: Sequence) -> int:
    """Predicted output tokens still to come (max_tokens left when there is no prediction).

    A sequence that has outrun its prediction is expected to make as many tokens again as it
    has made (capped by max_tokens), not 0: a misprediction must not win it the first place.
    """
    generated = len(seq.output_ids)
    left = seq.params.max_tokens - generated
    if seq.predicted_length is None:
        return left
    if generated < seq.predicted_length:
        return seq.predicted_length - generated
    return min(generated, left)


class SPFQueue:
    """Preempted sequences first (most recent first), then the rest by their aged key."""

    def __init__(self, aging: float, unknown_length: int):
        self.aging, self.unknown_length = aging, unknown_length
        self._front: deque[Sequence] = deque()
        self._rest: list[Sequence] = []
        self._sorted = True

    def key(self, seq: Sequence) -> float:
        length = self.unknown_length if seq.predicted_length is None else seq.predicted_length
        return length + self.aging * seq.arrival_time

    def push(self, seq: Sequence) -> None:
        self._rest.append(seq)
        self._sorted = False

    def push_front(self, seq: Sequence) -> None:
        self._front.appendleft(seq)

    def remove(self, seq: Sequence) -> None:
        if seq in self._front:
            self._front.remove(seq)
        else:
            self._rest.remove(seq)

    def __iter__(self) -> Iterator[Sequence]:
        if not self._sorted:  # stable: equal keys keep arrival order
            self._rest.sort(key=self.key)
            self._sorted = True
        yield from self._front
        yield from self._rest

    def __len__(self) -> int:
        return len(self._front) + len(self._rest)


class SPFPolicy(FCFSPolicy):
    def __init__(self, aging: float = DEFAULT_AGING, unknown_length: int = 0, lookahead: int = DEFAULT_LOOKAHEAD):
        self.aging, self.unknown_length, self.lookahead = aging, unknown_length, lookahead

    def new_queue(self) -> SPFQueue:
        return SPFQueue(self.aging, self.unknown_length)

    def decode_key(self, seq: Sequence) -> float:
        remaining = self.unknown_length if seq.predicted_length is None else remaining_work(seq)
        return remaining + self.aging * seq.arrival_time

    def decode_order(self, decodes: list[Sequence]) -> list[Sequence]:
        return sorted(decodes, key=self.decode_key)  # stable: equal keys keep admission order

    def preemption_victim(self, candidates: list[Sequence]) -> Sequence:
        # the last of the longest: among equals, the latest admitted (FCFS's choice)
        return max(reversed(candidates), key=remaining_work)


class ReservingSPFPolicy(SPFPolicy):
    def __init__(self, blocks: BlockManager, aging: float = DEFAULT_AGING, unknown_length: int = 0,
                 lookahead: int = DEFAULT_LOOKAHEAD, unknown_reserve: int = 256,
                 window_blocks: WindowBlockManager | None = None):
        super().__init__(aging, unknown_length, lookahead)
        self.blocks, self.unknown_reserve, self.window_blocks = blocks, unknown_reserve, window_blocks

    def predicted_total(self, seq: Sequence) -> int:
        """Tokens `seq` is predicted to hold at its end."""
        if seq.predicted_length is None:
            return len(seq.prompt_ids) + min(seq.params.max_tokens, self.unknown_reserve)
        return len(seq.prompt_ids) + max(seq.predicted_length, len(seq.output_ids) + self.blocks.block_size)

    def reserved_blocks(self, seq: Sequence) -> int:
        """Blocks `seq` is predicted to hold at its end, beyond those it holds now."""
        return self.blocks.blocks_needed(seq, self.predicted_total(seq))

    def can_admit(self, seq: Sequence, running: list[Sequence]) -> bool:
        if not running:  # alone it may always try: a reservation larger than the cache must not starve it
            return True
        promised = sum(self.reserved_blocks(s) for s in running)
        if promised + self.reserved_blocks(seq) > len(self.blocks.free_blocks):
            return False
        window = self.window_blocks
        if window is None:
            return True
        promised = sum(window.reserve(s, self.predicted_total(s)) for s in running + [seq])
        return promised <= len(window.free_blocks)


def make_policy(name: str, blocks: BlockManager, aging: float = DEFAULT_AGING, lookahead: int = DEFAULT_LOOKAHEAD,
                window_blocks: WindowBlockManager | None = None) -> SchedulingPolicy:
    """The policy an EngineConfig names (fcfs | spf | spf-reserve); `window_blocks`: the sliding-window
    pool, if the model has one (spf-reserve reserves in both pools)."""
    if name == "fcfs":
        return FCFSPolicy()
    if name == "spf":
        return SPFPolicy(aging, lookahead=lookahead)
    if name == "spf-reserve":
        return ReservingSPFPolicy(blocks, aging, lookahead=lookahead, window_blocks=window_blocks)
    raise ValueError(f"unknown scheduling policy {name!r}: fcfs, spf or spf-reserve")
