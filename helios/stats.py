"""Plain records of what the engine did: one per step, and running totals.

Metrics (deployments/metrics.py), the controller and the length predictor all read these
records; none of them reaches into the engine's scheduler or block manager. No torch here:
a controller that only needs these types imports nothing heavy.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass(frozen=True)
class FinishedRequest:
    """A request that ended in this step (finished or aborted). Times are time.monotonic()."""

    request_id: str
    num_prompt_tokens: int
    num_output_tokens: int
    finish_reason: str  # stop | length | abort | error | handed_off
    arrival_time: float
    first_token_time: float | None  # None when it ended before its first token
    finish_time: float
    predicted_length: int | None = None  # output tokens a length predictor expected, when one ran
    num_preemptions: int = 0
    mean_exit_layer: float | None = None  # mean decoder layers run per output token


@dataclass(frozen=True)
class StepStats:
    """One engine step: the work it did and the engine's state after it."""

    step_time_s: float  # wall time of the whole step (schedule, model, outputs)
    num_prompt_tokens: int  # prompt tokens computed for the first time (recomputation excluded)
    num_generation_tokens: int
    tokens_per_exit_layer: dict[int, int]  # generated tokens by decoder layers run
    confidence_breaches: int  # tokens forced out at the last loaded layer of a prefix load
    num_preemptions: int
    num_running: int
    num_waiting: int
    kv_cache_usage: float  # share of KV blocks in use, 0 to 1 (with a sliding-window pool: the fuller pool's)
    num_layers_loaded: int
    finished: tuple[FinishedRequest, ...] = ()


@dataclass
class EngineStats:
    """Running totals over an engine's life (the sum of its StepStats)."""

    steps: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    confidence_breaches: int = 0
    preemptions: int = 0
    tokens_per_exit_layer: Counter = field(default_factory=Counter)

    def add(self, step: StepStats) -> None:
        self.steps += 1
        self.prompt_tokens += step.num_prompt_tokens
        self.generation_tokens += step.num_generation_tokens
        self.confidence_breaches += step.confidence_breaches
        self.preemptions += step.num_preemptions
        self.tokens_per_exit_layer.update(step.tokens_per_exit_layer)
