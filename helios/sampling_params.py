"""What a request asks of generation: length, randomness, stops, logprobs."""

from __future__ import annotations

from dataclasses import dataclass, field

MAX_LOGPROBS = 20
GREEDY_BELOW = 1e-5  # temperatures under this are greedy decoding


@dataclass
class SamplingParams:
    """Sampling options of one request. ``temperature=0`` is greedy decoding."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # also return this many top alternatives per token
    skip_special_tokens: bool = True
    # refuse a request whose max_tokens does not fit in the context left after its prompt
    # (the HTTP API's default, as vLLM's); False: generation stops when the context is full
    strict_max_tokens: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 turns it off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise ValueError(f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")

    @property
    def greedy(self) -> bool:
        # as vLLM: below 1e-5 a temperature only overflows the logits; it means greedy
        return self.temperature < GREEDY_BELOW or self.top_k == 1
