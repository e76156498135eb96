"""OpenAI request bodies, and how they become a prompt plus `SamplingParams`.

Helios extras ride along as extra top-level fields (the `openai` client's `extra_body`):
`top_k`, `ignore_eos`, `return_exit_layers` (each choice then carries `exit_layers`, the
number of decoder layers each generated token ran), and `truncate_max_tokens` (a max_tokens the
context cannot hold shrinks to what fits instead of getting a 400).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from helios.sampling_params import MAX_LOGPROBS, SamplingParams

MIN_TEMPERATURE, MIN_TOP_P = 0.01, 1e-6
UNTIL_CONTEXT_FULL = 1 << 30  # chat without max_tokens: generate until a stop or the context is full


# strict: JSON types as the schema says (no `false` taken as the token id 0, no "3" as 3)
_STRICT = ConfigDict(extra="forbid", strict=True)


class StreamOptions(BaseModel):
    model_config = _STRICT

    include_usage: bool = False


class _Request(BaseModel):
    model_config = _STRICT

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None
    # accepted for compatibility; only their neutral value is supported
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    # Helios extras
    top_k: int = Field(0, ge=0)
    ignore_eos: bool = False
    return_exit_layers: bool = False
    return_predicted_length: bool = False  # each choice carries `predicted_length` (the model's length head)
    # a max_tokens larger than the context leaves after the prompt: a 400 naming both numbers (as
    # vLLM does), or, with this on, as many tokens as fit (OpenAI's and Helios's older behaviour)
    truncate_max_tokens: bool = False

    @model_validator(mode="after")
    def _neutral_only(self):
        if self.presence_penalty or self.frequency_penalty:
            raise ValueError("presence_penalty and frequency_penalty are not supported (leave them at 0)")
        if self.logit_bias:
            raise ValueError("logit_bias is not supported")
        return self

    @property
    def truncates(self) -> bool:
        """Whether max_tokens may shrink to what the context leaves (always for chat without max_tokens)."""
        return self.truncate_max_tokens

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def sampling_params(self, index: int, max_tokens: int, logprobs: int | None) -> SamplingParams:
        """The params of the `index`-th of n samples (seeded requests get seed + index)."""
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        # as vLLM does, a temperature in (0, 0.01) is 0.01 and top_p at least 1e-6 (the same choice of
        # tokens): logits / 1e-42, or a top_p that float32 rounds to 0, give the sampler NaN probabilities
        temperature = max(self.temperature, MIN_TEMPERATURE) if self.temperature else 0.0
        return SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=max(self.top_p, MIN_TOP_P),
                              top_k=self.top_k, seed=None if self.seed is None else self.seed + index,
                              stop=stop, ignore_eos=self.ignore_eos, logprobs=logprobs,
                              # refused up front unless the client lets generation stop at the context's end
                              strict_max_tokens=not self.truncates)


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False

    @model_validator(mode="after")
    def _check(self):
        if self.echo:
            raise ValueError("echo is not supported")
        if isinstance(self.prompt, list) and not self.prompt:
            raise ValueError("prompt must not be empty")
        return self

    def prompts(self) -> list[str | list[int]]:
        if isinstance(self.prompt, str) or all(isinstance(t, int) for t in self.prompt):
            return [self.prompt]
        return list(self.prompt)

    def params(self, index: int) -> SamplingParams:
        return self.sampling_params(index, self.max_tokens or 16, self.logprobs)


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True)  # extra fields (e.g. tool_calls) are ignored, as before
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None

    def text(self) -> str:
        """Plain text of the message; content parts other than text are refused."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError("only text content parts are supported")
            parts.append(part["text"])
        return "".join(parts)


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    @property
    def truncates(self) -> bool:
        return self.truncate_max_tokens or not (self.max_completion_tokens or self.max_tokens)

    def conversation(self) -> list[dict]:
        return [{"role": m.role, "content": m.text()} for m in self.messages]

    def params(self, index: int) -> SamplingParams:
        max_tokens = self.max_completion_tokens or self.max_tokens or UNTIL_CONTEXT_FULL
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return self.sampling_params(index, max_tokens, logprobs)


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error JSON, the body of every 4xx and 5xx (documented in the OpenAPI schema)."""

    error: ErrorDetail


def error_body(message: str, kind: str = "invalid_request_error", code: str | None = None,
               param: str | None = None) -> dict:
    """OpenAI's error JSON."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
