"""One request's state inside the engine."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from helios.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    prompt: str | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    predicted_length: int | None = None  # filled by a length predictor, read by policies
    status: SequenceStatus = SequenceStatus.WAITING
    output_ids: list[int] = field(default_factory=list)
    # exit_layers[j]: how many decoder layers ran for output token j
    exit_layers: list[int] = field(default_factory=list)
    logprobs: list[dict] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    num_preemptions: int = 0
    finish_reason: str | None = None
    output_text: str = ""
    first_token_time: float | None = None
    generator: torch.Generator | None = None

    def __post_init__(self) -> None:
        if self.params.seed is not None:
            self.generator = torch.Generator().manual_seed(self.params.seed)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

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
