"""What one request may ask for (the serving config's `limits:`), checked before anything reaches an engine.

The body size is checked earlier still, by the guard (deployments/guard.py), before the body is
parsed. Whether `max_tokens` fits the context after the prompt is known only once the prompt is
tokenized, so the engine checks that (`LLMEngine.make_sequence`).
"""

from __future__ import annotations

from deployments.config import LimitsConfig
from deployments.protocol import ChatCompletionRequest, CompletionRequest


def check_limits(body: CompletionRequest | ChatCompletionRequest, limits: LimitsConfig) -> None:
    """Raise ValueError naming the field, the value and the limit for the first limit `body` exceeds."""
    _at_most("n", body.n, limits.max_n)
    requested = body.max_completion_tokens if isinstance(body, ChatCompletionRequest) else None
    requested = requested or body.max_tokens
    if limits.max_tokens is not None and requested is not None:
        _at_most("max_tokens", requested, limits.max_tokens)
    top = body.top_logprobs if isinstance(body, ChatCompletionRequest) else body.logprobs
    if top is not None:
        _at_most("top_logprobs" if isinstance(body, ChatCompletionRequest) else "logprobs", top,
                 limits.max_top_logprobs)
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    _at_most("the number of stop strings", len(stops), limits.max_stop)
    _at_most("the length of a stop string", max(map(len, stops), default=0), limits.max_stop_chars)
    items, chars = _prompt_size(body)
    _at_most("the number of prompts or messages", items, limits.max_prompt_items)
    _at_most("the prompt's characters", chars, limits.max_prompt_chars)


def _prompt_size(body: CompletionRequest | ChatCompletionRequest) -> tuple[int, int]:
    """(prompts or messages, characters of text in them); token-id prompts count no characters."""
    if isinstance(body, ChatCompletionRequest):
        texts = [m.content if isinstance(m.content, str) else
                 "".join(str(part.get("text", "")) for part in m.content or []) for m in body.messages]
        return len(body.messages), sum(map(len, texts))
    prompts = body.prompts()
    return len(prompts), sum(len(p) for p in prompts if isinstance(p, str))


def _at_most(what: str, value: int, limit: int) -> None:
    if value > limit:
        raise ValueError(f"{what} is {value}; this server allows at most {limit}")
