"""Requests in: prompts to token ids (chat template applied) and validated Sequences.

Touches no engine state, so a serving front can run it on any thread (tokenizing a large
prompt must not hold up the loop that streams other requests' tokens).
"""

from __future__ import annotations

from helios.sampling_params import SamplingParams
from helios.sequence import Sequence

Prompt = str | list[int] | list[dict]  # text, token ids, or chat messages


class InputProcessor:
    def __init__(self, tokenizer, vocab_size: int, max_model_len: int):
        self.tokenizer, self.vocab_size, self.max_model_len = tokenizer, vocab_size, max_model_len

    def encode(self, prompt: Prompt) -> list[int]:
        """Token ids of a prompt; chat messages go through the model's chat template."""
        if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            return list(prompt)
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer: pass token ids")
        if isinstance(prompt, str):
            return self.tokenizer(prompt).input_ids
        if isinstance(prompt, list) and all(isinstance(m, dict) for m in prompt):
            if not self.tokenizer.chat_template:
                raise ValueError("this model has no chat template: send a plain prompt")
            text = self.tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
            return self.tokenizer(text, add_special_tokens=False).input_ids
        raise TypeError("a prompt is a string, a list of token ids, or a list of chat messages")

    def make_sequence(self, prompt: Prompt, params: SamplingParams, request_id: str) -> Sequence:
        """A validated Sequence; bad input raises ValueError."""
        ids = self.encode(prompt)
        if not ids:
            raise ValueError("the prompt is empty")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"the prompt has {len(ids)} tokens; this model's context is {self.max_model_len} tokens "
                             f"and at least one must be left to generate")
        if min(ids) < 0 or max(ids) >= self.vocab_size:
            raise ValueError(f"token ids must be in [0, {self.vocab_size})")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer; use stop_token_ids")
        room = self.max_model_len - len(ids)
        if params.strict_max_tokens and params.max_tokens > room:
            raise ValueError(f"max_tokens ({params.max_tokens}) is larger than the {room} tokens the context leaves "
                             f"after the {len(ids)}-token prompt (context: {self.max_model_len} tokens)")
        return Sequence(request_id, ids, params)
