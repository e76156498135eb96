"""One request's state inside the engine. Only the scheduler changes it after it is queued."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from helios.sampling_params import SamplingParams
from helios.stats import FinishedRequest


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)  # identity: the scheduler finds sequences in its queues by object
class Sequence:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    arrival_time: float = field(default_factory=time.monotonic)
    predicted_length: int | None = None  # output tokens a length predictor expects; read by policies
    status: SequenceStatus = SequenceStatus.WAITING
    output_ids: list[int] = field(default_factory=list)
    # exit_layers[j]: how many decoder layers ran for output token j
    exit_layers: list[int] = field(default_factory=list)
    logprobs: list[dict] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)  # full-attention layers: logical blocks 0, 1, ...
    # sliding-window layers (a second pool, when the model mixes both): window_table[i] holds
    # logical block window_dropped + i; the blocks before fell out of the window and were freed
    window_table: list[int] = field(default_factory=list)
    window_dropped: int = 0
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    num_preemptions: int = 0
    finish_reason: str | None = None
    first_token_time: float | None = None
    generator: torch.Generator | None = None

    def __post_init__(self) -> None:
        if self.params.seed is not None:
            self.generator = torch.Generator().manual_seed(self.params.seed)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def token_ids(self, start: int, end: int) -> list[int]:
        """Ids at positions [start, end) of prompt + output, without joining the two lists."""
        num_prompt = len(self.prompt_ids)
        if end <= num_prompt:
            return self.prompt_ids[start:end]
        if start >= num_prompt:
            return self.output_ids[start - num_prompt:end - num_prompt]
        return self.prompt_ids[start:] + self.output_ids[:end - num_prompt]

    @property
    def finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def forced_exit(self, position: int) -> int | None:
        """Layers the row at `position` ran when its output token was made, for replay after preemption.

        The row at position p produced token p+1; a prompt row before the last produced nothing
        and runs full depth (None).
        """
        index = position - len(self.prompt_ids) + 1
        return self.exit_layers[index] if 0 <= index < len(self.exit_layers) else None

    def record(self) -> FinishedRequest:
        """The plain record of this request once it has ended."""
        exits = self.exit_layers
        return FinishedRequest(
            request_id=self.request_id, num_prompt_tokens=len(self.prompt_ids), num_output_tokens=len(self.output_ids),
            finish_reason=self.finish_reason or "abort", arrival_time=self.arrival_time,
            first_token_time=self.first_token_time, finish_time=time.monotonic(),
            predicted_length=self.predicted_length, num_preemptions=self.num_preemptions,
            mean_exit_layer=sum(exits) / len(exits) if exits else None)
