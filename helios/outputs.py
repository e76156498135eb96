"""The one loop over a step's results: incremental detokenization, stop checks, delta outputs.

Per request and per step this costs the new tokens only, never the whole history: text is
decoded over a short window of recent tokens (as vLLM's and transformers' streaming
detokenizers do), stop strings are searched in the new text plus the few characters held
back for them, and each output carries what the step added. The full token ids, exit
layers and text are put together once, in the output that finishes the request.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from helios.sequence import Sequence

# tokens of context a window keeps before the text it emits, so a token's text (a leading
# space, a merged character) decodes as it does in the whole text
_WINDOW_CONTEXT = 6


@dataclass
class RequestOutput:
    """What one step added to a request; the output that finishes it also carries the whole result."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    new_exit_layers: list[int]
    new_logprobs: list[dict] | None  # when the request asked for logprobs
    finished: bool
    finish_reason: str | None
    num_prompt_tokens: int
    num_output_tokens: int  # all output tokens so far, these included
    num_preemptions: int = 0
    # the whole result, only in the finishing output (None before)
    prompt_token_ids: list[int] | None = None
    token_ids: list[int] | None = None
    exit_layers: list[int] | None = None
    logprobs: list[dict] | None = None
    text: str | None = None
    # output tokens the length head predicted: in the first output and the finishing one (None: no head)
    predicted_length: int | None = None
    # why the request failed, when finish_reason is "error" (a fault in its own sampling or output
    # processing: the engine ended it alone and went on with the others)
    error: str | None = None

    def merged(self, later: "RequestOutput") -> "RequestOutput":
        """This output followed by `later`, as one (for streams that send several steps at once)."""
        logprobs = None if self.new_logprobs is None else self.new_logprobs + (later.new_logprobs or [])
        return RequestOutput(
            self.request_id, self.new_token_ids + later.new_token_ids, self.new_text + later.new_text,
            self.new_exit_layers + later.new_exit_layers, logprobs, later.finished, later.finish_reason,
            later.num_prompt_tokens, later.num_output_tokens, later.num_preemptions, later.prompt_token_ids,
            later.token_ids, later.exit_layers, later.logprobs, later.text,
            self.predicted_length if later.predicted_length is None else later.predicted_length, later.error)


class IncrementalDetokenizer:
    """Text of each new token, decoded over a window of recent tokens; an incomplete UTF-8
    character is held back until the token that completes it arrives."""

    def __init__(self, tokenizer, skip_special_tokens: bool):
        self.tokenizer, self.skip_special = tokenizer, skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0  # window start
        self.read_offset = 0  # tokens before this have had their text emitted

    def push(self, token: int) -> str:
        self.ids.append(token)
        decode = lambda ids: self.tokenizer.decode(ids, skip_special_tokens=self.skip_special)  # noqa: E731
        prefix_text = decode(self.ids[self.prefix_offset:self.read_offset])
        text = decode(self.ids[self.prefix_offset:])
        if len(text) <= len(prefix_text) or text.endswith("\ufffd"):
            return ""  # nothing new yet, or half a character
        self.read_offset = len(self.ids)
        self.prefix_offset = max(self.prefix_offset, self.read_offset - _WINDOW_CONTEXT)
        return text[len(prefix_text):]


@dataclass
class _RequestState:
    detokenizer: IncrementalDetokenizer | None
    stops: list[str]
    hold: int  # characters kept back: the start of a stop string may be at the end of the text
    pending: str = ""  # decoded, not yet sent
    pieces: list[str] = field(default_factory=list)  # text sent so far, joined once at the end


class OutputProcessor:
    def __init__(self, tokenizer, eos_ids: set[int], max_model_len: int):
        self.tokenizer, self.eos_ids, self.max_model_len = tokenizer, eos_ids, max_model_len
        self.states: dict[str, _RequestState] = {}

    def add(self, seq: Sequence) -> None:
        p = seq.params
        detok = IncrementalDetokenizer(self.tokenizer, p.skip_special_tokens) if self.tokenizer is not None else None
        hold = max((len(s) for s in p.stop), default=1) - 1
        self.states[seq.request_id] = _RequestState(detok, list(p.stop), hold)

    def remove(self, request_id: str) -> None:
        self.states.pop(request_id, None)

    def fail(self, seq: Sequence, error: str) -> RequestOutput:
        """The finishing output of a request that a fault of its own ended: no new token, the text
        and tokens sent before it, finish_reason "error"; its state is dropped."""
        state = self.states.pop(seq.request_id, None)
        return RequestOutput(
            seq.request_id, [], "", [], None if seq.params.logprobs is None else [], True, "error",
            len(seq.prompt_ids), len(seq.output_ids), seq.num_preemptions, prompt_token_ids=seq.prompt_ids,
            token_ids=list(seq.output_ids), exit_layers=list(seq.exit_layers),
            logprobs=None if seq.params.logprobs is None else list(seq.logprobs),
            text="".join(state.pieces) if state is not None else "", predicted_length=seq.predicted_length,
            error=error)

    def process(self, seq: Sequence, token: int, exit_layer: int, logprob: dict | None) -> RequestOutput:
        """The output for `seq`'s new token (not yet appended to it), with its finish reason if it ends."""
        state = self.states[seq.request_id]
        text, stopped = self._new_text(state, token)
        reason = "stop" if stopped else self._finish_reason(seq, token)
        if reason and not stopped:  # ended otherwise: the held-back text goes out
            text, state.pending = text + state.pending, ""
        state.pieces.append(text)
        out = RequestOutput(seq.request_id, [token], text, [exit_layer],
                            None if seq.params.logprobs is None else [logprob], reason is not None, reason,
                            len(seq.prompt_ids), len(seq.output_ids) + 1, seq.num_preemptions)
        if reason:
            self._complete(out, seq, state, token, exit_layer, logprob)
            del self.states[seq.request_id]
        return out

    def _new_text(self, state: _RequestState, token: int) -> tuple[str, bool]:
        """(text to send now, whether a stop string ended the request)."""
        if state.detokenizer is None:
            return "", False
        text = state.pending + state.detokenizer.push(token)
        for stop in state.stops:  # a stop string can only end in the unsent text
            at = text.find(stop)
            if at >= 0:
                state.pending = ""
                return text[:at], True
        cut = len(text) - min(state.hold, len(text))
        state.pending = text[cut:]
        return text[:cut], False

    def _finish_reason(self, seq: Sequence, token: int) -> str | None:
        p = seq.params
        if token in p.stop_token_ids or (not p.ignore_eos and token in self.eos_ids):
            return "stop"
        if len(seq.output_ids) + 1 >= p.max_tokens or seq.num_tokens + 1 >= self.max_model_len:
            return "length"
        return None

    @staticmethod
    def _complete(out: RequestOutput, seq: Sequence, state: _RequestState, token: int, exit_layer: int,
                  logprob: dict | None) -> None:
        """Attach the whole result (once per request)."""
        out.prompt_token_ids = seq.prompt_ids
        out.token_ids = seq.output_ids + [token]
        out.exit_layers = seq.exit_layers + [exit_layer]
        if seq.params.logprobs is not None:
            out.logprobs = seq.logprobs + [logprob]
        out.text = "".join(state.pieces)
        out.predicted_length = seq.predicted_length
