"""OpenAI response bodies and stream chunks, built from the deltas `LLMServer.generate` yields."""

from __future__ import annotations

import json
import time
import uuid


class ChoiceState:
    """One choice (one prompt x one of n samples) as its deltas arrive."""

    def __init__(self, index: int, chat: bool, want_logprobs: bool, want_exit_layers: bool,
                 want_predicted_length: bool = False):
        self.index, self.chat = index, chat
        self.want_predicted_length = want_predicted_length
        self.predicted_length: int | None = None  # the engine's length prediction, when it has a head
        self.want_logprobs, self.want_exit_layers = want_logprobs, want_exit_layers
        self.text = ""
        self.logprobs: list[dict] = []
        self.exit_layers: list[int] = []
        self.finish_reason: str | None = None
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.sent_role = False

    def add(self, delta: dict) -> None:
        self.text += delta["text"]
        self.logprobs += delta.get("logprobs", [])
        self.exit_layers += delta["exit_layers"]
        self.predicted_length = delta.get("predicted_length", self.predicted_length)
        self.finish_reason = delta["finish_reason"]
        self.prompt_tokens = delta["prompt_tokens"]
        self.completion_tokens = delta["completion_tokens"]

    def full(self) -> dict:
        """The choice of a non-streaming response."""
        return self._choice("message", self.text, self.logprobs, self.exit_layers, self.finish_reason, role=True)

    def chunk(self, delta: dict) -> dict:
        """The choice of one stream chunk carrying `delta` (already added); chat's first says the role."""
        first = not self.sent_role
        self.sent_role = True
        return self._choice("delta", delta["text"], delta.get("logprobs", []), delta["exit_layers"],
                            delta["finish_reason"], role=first)

    def _choice(self, message_key: str, text: str, logprobs: list[dict], exit_layers: list[int],
                finish_reason: str | None, role: bool) -> dict:
        choice: dict = {"index": self.index}
        if self.chat:
            choice[message_key] = {"role": "assistant", "content": text} if role else {"content": text}
        else:
            choice["text"] = text
        choice["logprobs"] = self._logprobs(logprobs) if self.want_logprobs else None
        choice["finish_reason"] = finish_reason
        if self.want_exit_layers:
            choice["exit_layers"] = exit_layers
        if self.want_predicted_length:  # null when the model has no length head
            choice["predicted_length"] = self.predicted_length
        return choice

    def _logprobs(self, entries: list[dict]) -> dict:
        if self.chat:
            return {"content": [_chat_logprob(e) for e in entries]}
        return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
                "top_logprobs": [dict(e["top"]) for e in entries], "text_offset": _offsets(entries, len(self.text))}


def _chat_logprob(entry: dict) -> dict:
    def item(token: str, logprob: float) -> dict:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

    return {**item(entry["token"], entry["logprob"]), "top_logprobs": [item(t, lp) for t, lp in entry["top"]]}


def _offsets(entries: list[dict], end: int) -> list[int]:
    """Character offset of each token in the text, counted back from where the text ends."""
    offsets, position = [], end - sum(len(e["token"]) for e in entries)
    for entry in entries:
        offsets.append(max(position, 0))
        position += len(entry["token"])
    return offsets


class ResponseBuilder:
    """Ids, envelopes and usage for one request (completions or chat)."""

    def __init__(self, model: str, chat: bool):
        self.model, self.chat = model, chat
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def envelope(self, choices: list[dict], chunk: bool) -> dict:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices}

    @staticmethod
    def usage(choices: list[ChoiceState], prompts_per_choice: int) -> dict:
        """Prompt tokens count once per prompt (not once per sample), as OpenAI does."""
        prompt = sum(c.prompt_tokens for c in choices[::prompts_per_choice])
        completion = sum(c.completion_tokens for c in choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def sse_event(payload: dict) -> str:
    """One server-sent event carrying a JSON payload."""
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"
