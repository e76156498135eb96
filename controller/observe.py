"""Live telemetry the controller keeps: the breach window and the figures of one interval.

Both are fed the engine's StepStats (helios/stats.py), one per engine step.
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field

from helios.stats import StepStats


class BreachWindow:
    """Confidence breaches among the last `tokens` generated tokens."""

    def __init__(self, tokens: int):
        self.flags: deque[bool] = deque(maxlen=tokens)
        self.count = 0

    def observe(self, step: StepStats) -> None:
        generated, breaches = step.num_generation_tokens, min(step.confidence_breaches, step.num_generation_tokens)
        # a step's breaches are spread evenly over its tokens: their order inside a step is unknown,
        # and bunching them at one end would shift counts when the window cuts through a step
        for i in range(generated):
            self._push((i + 1) * breaches // generated > i * breaches // generated)

    def _push(self, breach: bool) -> None:
        if len(self.flags) == self.flags.maxlen and self.flags[0]:
            self.count -= 1
        self.flags.append(breach)
        self.count += breach

    def exceeds(self, limit: int) -> bool:
        return self.count > limit


@dataclass
class IntervalStats:
    """What the engine did since the last reassessment, at the depth it ran."""

    depth: int
    tokens_per_exit_layer: Counter = field(default_factory=Counter)
    breaches: int = 0
    generated_tokens: int = 0
    finished_requests: int = 0
    ttft_s: list[float] = field(default_factory=list)
    tpot_s: list[float] = field(default_factory=list)

    def observe(self, step: StepStats) -> None:
        self.tokens_per_exit_layer.update(step.tokens_per_exit_layer)
        self.breaches += step.confidence_breaches
        self.generated_tokens += step.num_generation_tokens
        for request in step.finished:
            self.finished_requests += 1
            if request.first_token_time is None:
                continue
            self.ttft_s.append(request.first_token_time - request.arrival_time)
            if request.num_output_tokens > 1:
                decode_s = request.finish_time - request.first_token_time
                self.tpot_s.append(decode_s / (request.num_output_tokens - 1))

    def breach_share(self) -> float:
        return self.breaches / self.generated_tokens if self.generated_tokens else 0.0

    def exit_distribution(self) -> dict[int, float]:
        total = sum(self.tokens_per_exit_layer.values())
        return {layer: n / total for layer, n in sorted(self.tokens_per_exit_layer.items())} if total else {}
