"""Offline use: ``LLM(model=...).generate(prompts, SamplingParams(...))``."""

from __future__ import annotations

from typing import Sequence as Seq

from helios.config import DEFAULT_MODEL, EngineConfig
from helios.engine import LLMEngine
from helios.inputs import Prompt
from helios.outputs import RequestOutput
from helios.sampling_params import SamplingParams


def _as_prompt_list(prompts: Prompt | Seq[Prompt]) -> list[Prompt]:
    """One prompt (text, token ids, chat messages) or a list of them -> a list."""
    if isinstance(prompts, str):
        return [prompts]
    if prompts and all(isinstance(p, int) for p in prompts):
        return [list(prompts)]
    if prompts and all(isinstance(p, dict) for p in prompts):
        return [list(prompts)]
    return list(prompts)


class LLM:
    def __init__(self, model: str = DEFAULT_MODEL, **options):
        self.engine = LLMEngine(EngineConfig(model=model, **options))

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: Prompt | Seq[Prompt], sampling_params: SamplingParams | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """Run prompts to completion; the finishing outputs (whole results) in the order of the prompts."""
        prompt_list = _as_prompt_list(prompts)
        ids = []
        try:
            for prompt in prompt_list:
                ids.append(self.engine.add_request(prompt, sampling_params).request_id)
        except Exception:
            for request_id in ids:  # a bad prompt leaves nothing queued behind it
                self.engine.abort(request_id)
            raise
        finished: dict[str, RequestOutput] = {}
        progress = None
        if use_tqdm:
            from tqdm import tqdm

            progress = tqdm(total=len(ids), desc="generating", unit="req")
        while len(finished) < len(ids):
            for out in self.engine.step():
                if out.finished:
                    finished[out.request_id] = out
                    if progress:
                        progress.update(1)
        if progress:
            progress.close()
        return [finished[i] for i in ids]

    def chat(self, messages: list[dict] | list[list[dict]], sampling_params: SamplingParams | None = None,
             use_tqdm: bool = False) -> list[RequestOutput]:
        """Generate replies to one conversation or a list of conversations."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        return self.generate(conversations, sampling_params, use_tqdm)
