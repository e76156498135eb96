"""Iteration-level scheduling: which tokens of which sequences run in the next step.

Each step first gives every running sequence its next token (decode), then spends the
rest of the token budget on prompt chunks (chunked prefill), so a long prompt never
stalls decoding. When KV blocks run out the latest admitted sequence is preempted: its
blocks are freed and it is requeued at the front, to be recomputed later; nothing is lost.
The order and admission of waiting sequences belong to a policy object.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Iterable, Protocol

from helios.block_manager import BlockManager
from helios.sequence import Sequence, SequenceStatus


class SchedulingPolicy(Protocol):
    """Orders the waiting queue and decides admission (length-aware policies plug in here)."""

    def order(self, waiting: Iterable[Sequence]) -> list[Sequence]: ...

    def can_admit(self, seq: Sequence, running: list[Sequence]) -> bool: ...


class FCFSPolicy:
    """First come, first served; admit whenever resources allow."""

    def order(self, waiting: Iterable[Sequence]) -> list[Sequence]:
        return list(waiting)

    def can_admit(self, seq: Sequence, running: list[Sequence]) -> bool:
        return True


@dataclass
class Chunk:
    """Tokens [start, end) of `seq` computed this step; `sample` when the chunk reaches its end."""

    seq: Sequence
    start: int
    end: int

    @property
    def sample(self) -> bool:
        return self.end == self.seq.num_tokens

    @property
    def is_decode(self) -> bool:
        return self.end - self.start == 1 and self.sample


@dataclass
class SchedulerOutput:
    chunks: list[Chunk] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.chunks


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        policy: SchedulingPolicy | None = None,
    ):
        self.blocks = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.policy = policy or FCFSPolicy()
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self._schedule_running(out, self.max_num_batched_tokens)
        if not out.preempted:  # admitting while preempting would only thrash
            self._admit_waiting(out, budget)
        return out

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        # decodes first (stable sort keeps admission order), then unfinished prompts
        queue = sorted(self.running, key=lambda s: s.num_tokens - s.num_computed_tokens > 1)
        while queue and budget > 0:
            seq = queue.pop(0)
            end = seq.num_computed_tokens + min(seq.num_tokens - seq.num_computed_tokens, budget)
            while not self.blocks.can_grow(seq, end):
                victim = queue.pop() if queue else seq  # latest admitted goes first
                self._preempt(victim, out)
                if victim is seq:
                    break
            else:
                self.blocks.grow(seq, end)
                out.chunks.append(Chunk(seq, seq.num_computed_tokens, end))
                budget -= end - seq.num_computed_tokens
        return budget

    def _admit_waiting(self, out: SchedulerOutput, budget: int) -> None:
        for seq in self.policy.order(self.waiting):
            if budget <= 0 or len(self.running) >= self.max_num_seqs:
                break
            if not self.policy.can_admit(seq, self.running):
                continue
            end = seq.num_computed_tokens + min(seq.num_tokens - seq.num_computed_tokens, budget)
            if not self.blocks.can_grow(seq, end):
                break
            self.blocks.grow(seq, end)
            self.waiting.remove(seq)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.chunks.append(Chunk(seq, seq.num_computed_tokens, end))
            budget -= end - seq.num_computed_tokens

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.blocks.free(seq)
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self.running.remove(seq)
        self.waiting.appendleft(seq)
        out.preempted.append(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Remove a sequence (done or aborted) and free its blocks."""
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        self.blocks.free(seq)
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
