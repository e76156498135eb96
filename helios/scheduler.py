"""Iteration-level scheduling: which tokens of which sequences run in the next step.

Each step first gives the running sequences their next token (decode; at most
`max_num_seqs` of them, in the policy's order), then spends the rest of the token budget
on prompt chunks (chunked prefill), so a long prompt never stalls decoding. When KV blocks
run out a running sequence is preempted: its blocks are freed and it is requeued at the
front, to be recomputed later; nothing is lost. Models that mix sliding-window and full
layers (Gemma 3) have a second pool for the window layers: a step needs room in both, and
after it the window blocks no future query can see are freed (`WindowBlockManager.drop_old`).

The scheduler owns its sequences: after the step, `update` appends the sampled tokens,
advances the computed counts and finishes what ended. A policy object decides the order
of the waiting queue, admission, and which sequence a preemption takes.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Iterator, Protocol

from helios.block_manager import BlockManager, WindowBlockManager
from helios.sequence import Sequence, SequenceStatus
from helios.stats import FinishedRequest


class WaitingQueue(Protocol):
    """The waiting sequences in the order a policy admits them."""

    def push(self, seq: Sequence) -> None: ...  # a new arrival

    def push_front(self, seq: Sequence) -> None: ...  # a preempted sequence: first to come back

    def remove(self, seq: Sequence) -> None: ...

    def __iter__(self) -> Iterator[Sequence]: ...  # admission order

    def __len__(self) -> int: ...


class SchedulingPolicy(Protocol):
    """Admission order, admission, decode order and preemption victims (length-aware policies plug in here).

    `lookahead`: sequences admitted beyond `max_num_seqs`. They are prefilled (which gives them
    their first token and, with a length head, their predicted length), then decode only while
    `decode_order` ranks them among the first `max_num_seqs`; the others are parked, keeping
    their KV blocks. FCFS has none: every admitted sequence decodes every step.
    """

    lookahead: int

    def new_queue(self) -> WaitingQueue: ...

    def decode_order(self, decodes: list[Sequence]) -> list[Sequence]: ...

    def can_admit(self, seq: Sequence, running: list[Sequence]) -> bool: ...

    def preemption_victim(self, candidates: list[Sequence]) -> Sequence: ...


class FCFSQueue:
    """Arrival order; removing the head (the common case) is O(1)."""

    def __init__(self) -> None:
        self._items: deque[Sequence] = deque()

    def push(self, seq: Sequence) -> None:
        self._items.append(seq)

    def push_front(self, seq: Sequence) -> None:
        self._items.appendleft(seq)

    def remove(self, seq: Sequence) -> None:
        if self._items and self._items[0] is seq:
            self._items.popleft()
        else:
            self._items.remove(seq)

    def __iter__(self) -> Iterator[Sequence]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)


class FCFSPolicy:
    """First come, first served; admit whenever resources allow; preempt the latest admitted."""

    lookahead = 0

    def new_queue(self) -> FCFSQueue:
        return FCFSQueue()

    def decode_order(self, decodes: list[Sequence]) -> list[Sequence]:
        return decodes  # admission order

    def can_admit(self, seq: Sequence, running: list[Sequence]) -> bool:
        return True

    def preemption_victim(self, candidates: list[Sequence]) -> Sequence:
        return candidates[-1]  # candidates come in admission order


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


@dataclass
class SampledToken:
    """What a step made for one sequence; `finish_reason` set when that token ends it."""

    seq: Sequence
    token: int
    exit_layer: int
    logprob: dict | None
    finish_reason: str | None
    predicted_length: int | None = None  # the length head's prediction, made with a request's first token


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 policy: SchedulingPolicy | None = None, window_blocks: WindowBlockManager | None = None):
        self.blocks = block_manager
        self.window_blocks = window_blocks  # the sliding-window layers' pool, if the model has one
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.policy = policy or FCFSPolicy()
        self.waiting: WaitingQueue = self.policy.new_queue()
        self.running: list[Sequence] = []
        self.finished: list[FinishedRequest] = []  # ended since the last `take_finished`

    def add(self, seq: Sequence) -> None:
        self.waiting.push(seq)

    def has_work(self) -> bool:
        return bool(len(self.waiting) or self.running)

    # ---- before the step ------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self._schedule_running(out, self.max_num_batched_tokens)
        if not out.preempted:  # admitting while preempting would only thrash
            self._admit_waiting(out, budget)
        return out

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        # decodes first, in the policy's order and at most max_num_seqs of them (the rest stay
        # parked this step, KV kept), then unfinished prompts in admission order
        decodes = self.policy.decode_order([s for s in self.running if s.num_tokens - s.num_computed_tokens == 1])
        parked = decodes[self.max_num_seqs:]
        queue = decodes[:self.max_num_seqs] + [s for s in self.running if s.num_tokens - s.num_computed_tokens > 1]
        while queue and budget > 0:
            seq = queue.pop(0)
            end = seq.num_computed_tokens + min(seq.num_tokens - seq.num_computed_tokens, budget)
            while not self._can_grow(seq, end):
                # candidates: those scheduled this step, this one, the rest, the parked (FCFS takes the last)
                victim = self.policy.preemption_victim([c.seq for c in out.chunks] + [seq] + queue + parked)
                budget += self._unschedule(victim, out)
                self._preempt(victim, out)
                if victim is seq:
                    break
                for pool in (queue, parked):
                    if victim in pool:
                        pool.remove(victim)
            else:
                self._grow(seq, end)
                out.chunks.append(Chunk(seq, seq.num_computed_tokens, end))
                budget -= end - seq.num_computed_tokens
        return budget

    def _admit_waiting(self, out: SchedulerOutput, budget: int) -> None:
        admitted = []
        for seq in self.waiting:
            if budget <= 0 or len(self.running) >= self.max_num_seqs + self.policy.lookahead:
                break
            if not self.policy.can_admit(seq, self.running):
                continue
            end = seq.num_computed_tokens + min(seq.num_tokens - seq.num_computed_tokens, budget)
            if not self._can_grow(seq, end):
                break
            self._grow(seq, end)
            admitted.append(seq)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.chunks.append(Chunk(seq, seq.num_computed_tokens, end))
            budget -= end - seq.num_computed_tokens
        for seq in admitted:  # after the loop: the queue is not changed while iterated
            self.waiting.remove(seq)

    def _can_grow(self, seq: Sequence, end: int) -> bool:
        """Room for tokens up to `end` of `seq` in every pool."""
        return self.blocks.can_grow(seq, end) and (self.window_blocks is None or self.window_blocks.can_grow(seq, end))

    def _grow(self, seq: Sequence, end: int) -> None:
        self.blocks.grow(seq, end)
        if self.window_blocks is not None:
            self.window_blocks.grow(seq, end)

    def _free(self, seq: Sequence) -> None:
        self.blocks.free(seq)
        if self.window_blocks is not None:
            self.window_blocks.free(seq)

    @staticmethod
    def _unschedule(seq: Sequence, out: SchedulerOutput) -> int:
        """Drop `seq`'s chunk from this step, if it has one; return the tokens it had taken."""
        for i, chunk in enumerate(out.chunks):
            if chunk.seq is seq:
                del out.chunks[i]
                return chunk.end - chunk.start
        return 0

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self._free(seq)
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self.running.remove(seq)
        self.waiting.push_front(seq)
        out.preempted.append(seq)

    # ---- after the step -------------------------------------------------------------

    def update(self, batch: SchedulerOutput, sampled: list[SampledToken], now: float) -> None:
        """Apply a step's result: computed tokens advance, new tokens are appended, ended sequences finish."""
        for chunk in batch.chunks:
            chunk.seq.num_computed_tokens = chunk.end
            if self.window_blocks is not None:  # blocks this step pushed out of the window
                self.window_blocks.drop_old(chunk.seq)
        for item in sampled:
            seq = item.seq
            seq.output_ids.append(item.token)
            seq.exit_layers.append(item.exit_layer)
            if item.logprob is not None:
                seq.logprobs.append(item.logprob)
            if seq.first_token_time is None:
                seq.first_token_time = now
            if item.predicted_length is not None:
                seq.predicted_length = item.predicted_length
            if item.finish_reason:
                self.finish(seq, item.finish_reason)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Remove a sequence (done or aborted) and free its blocks."""
        if seq.finished:
            return
        was_running = seq.status is SequenceStatus.RUNNING
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        self._free(seq)
        if was_running:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        self.finished.append(seq.record())

    def take_finished(self) -> list[FinishedRequest]:
        """Records of the sequences that ended since the last call."""
        finished, self.finished = self.finished, []
        return finished
