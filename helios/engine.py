"""The synchronous engine: add requests, step, collect outputs. No Ray, no asyncio."""

from __future__ import annotations

import dataclasses
import itertools
import logging
from collections import Counter
from dataclasses import dataclass, field

import torch

from helios.block_manager import BlockManager, kv_bytes_per_token, num_blocks_for_budget
from helios.config import EngineConfig
from helios.exits import ExitHead, apply_calibration, load_exit_heads
from helios.loader import load_model
from helios.runner import ModelRunner
from helios.sampler import sample
from helios.sampling_params import SamplingParams
from helios.scheduler import Scheduler
from helios.sequence import Sequence

logger = logging.getLogger("helios")

Prompt = str | list[int] | list[dict]  # text, token ids, or chat messages


@dataclass
class RequestOutput:
    """A request's state after a step; `new_*` hold what this step added (for streaming)."""

    request_id: str
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    exit_layers: list[int]
    finished: bool
    finish_reason: str | None
    new_text: str = ""
    new_token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict] | None = None
    num_preemptions: int = 0

    def followed_by(self, later: "RequestOutput") -> "RequestOutput":
        """`later`, with this output's new text and tokens in front: two deltas as one."""
        return dataclasses.replace(later, new_text=self.new_text + later.new_text,
                                   new_token_ids=self.new_token_ids + later.new_token_ids)


@dataclass
class EngineStats:
    steps: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    confidence_breaches: int = 0
    preemptions: int = 0
    tokens_per_exit_layer: Counter = field(default_factory=Counter)


def _resolve_device(config: EngineConfig) -> str:
    return config.device if config.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")


class LLMEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        device = _resolve_device(config)
        loaded = load_model(config.model, config.max_layers, dtype=config.dtype, device=device)
        self.model, self.arch, self.tokenizer = loaded.model, loaded.arch, loaded.tokenizer
        dtype = self.model.embed_tokens.weight.dtype
        self.num_loaded_layers = self.model.num_loaded_layers
        heads, confidence = self._exit_heads(config)
        per_token = kv_bytes_per_token(self.num_loaded_layers, self.arch.num_kv_heads, self.arch.head_dim,
                                       dtype.itemsize)
        num_blocks = num_blocks_for_budget(config.kv_cache_memory, config.block_size, per_token)
        self.blocks = BlockManager(num_blocks, config.block_size)
        capacity = num_blocks * config.block_size
        self.max_model_len = min(config.max_model_len or self.arch.max_position, self.arch.max_position, capacity)
        logger.info("loaded %s: %d of %d layers on %s/%s; KV cache: %d blocks x %d tokens = %d tokens (%.0f MiB)",
                    loaded.source, self.num_loaded_layers, self.arch.num_layers, device, str(dtype).split(".")[-1],
                    num_blocks, config.block_size, capacity, num_blocks * config.block_size * per_token / 2**20)
        self.runner = ModelRunner(self.model, num_blocks, config.block_size, heads, config.exit_policy,
                                  confidence, config.exit_profile, config.seed)
        self.scheduler = Scheduler(self.blocks, config.max_num_seqs, config.max_num_batched_tokens)
        self.eos_ids = self._eos_ids(loaded.hf_config)
        self.sequences: dict[str, Sequence] = {}
        self.stats = EngineStats()
        self._ids = itertools.count()

    def _exit_heads(self, config: EngineConfig) -> tuple[list[ExitHead], str]:
        """The exit heads and the confidence measure they are checked with."""
        if config.exit_heads:
            heads, meta = load_exit_heads(config.exit_heads, self.model)
            if config.exit_target is not None:
                apply_calibration(heads, meta, config.exit_target)
            return heads, config.confidence or meta.get("confidence", "max_prob")
        for layer in config.exit_layers:
            if layer > self.arch.num_layers:
                raise ValueError(f"exit layer {layer} is past the model's {self.arch.num_layers} layers")
        heads = [ExitHead(layer, config.exit_threshold) for layer in sorted(set(config.exit_layers))]
        return heads, config.confidence or "max_prob"

    def _eos_ids(self, hf_config) -> set[int]:
        ids = getattr(hf_config, "eos_token_id", None)
        ids = set(ids if isinstance(ids, list) else [] if ids is None else [ids])
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return ids

    # ---- requests -----------------------------------------------------------------

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

    def add_request(self, prompt: Prompt, params: SamplingParams | None = None,
                    request_id: str | None = None) -> Sequence:
        """Validate and queue a request; bad input raises ValueError and changes nothing."""
        seq = self.make_sequence(prompt, params, request_id)
        self.add_sequence(seq)
        return seq

    def add_sequence(self, seq: Sequence) -> None:
        if seq.request_id in self.sequences:
            raise ValueError(f"request id {seq.request_id!r} is already in use")
        self.sequences[seq.request_id] = seq
        self.scheduler.add(seq)

    def make_sequence(self, prompt: Prompt, params: SamplingParams | None = None,
                      request_id: str | None = None) -> Sequence:
        """Validate a request into a Sequence without touching engine state (safe from any thread)."""
        params = params or SamplingParams()
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        if request_id in self.sequences:
            raise ValueError(f"request id {request_id!r} is already in use")
        ids = self.encode(prompt)
        if not ids:
            raise ValueError("the prompt is empty")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"the prompt has {len(ids)} tokens; this model's context is {self.max_model_len} tokens "
                             f"and at least one must be left to generate")
        if min(ids) < 0 or max(ids) >= self.arch.vocab_size:
            raise ValueError(f"token ids must be in [0, {self.arch.vocab_size})")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer; use stop_token_ids")
        return Sequence(request_id, ids, params, prompt=prompt if isinstance(prompt, str) else None)

    def abort(self, request_id: str) -> None:
        """Drop a request and free its KV blocks (unknown or finished ids are ignored)."""
        seq = self.sequences.pop(request_id, None)
        if seq is not None and not seq.finished:
            self.scheduler.finish(seq, "abort")

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    # ---- the step -----------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one iteration; return the requests that got a token or finished."""
        batch = self.scheduler.schedule()
        self.stats.preemptions += len(batch.preempted)
        if batch.empty:
            return []
        inputs, sampled_chunks = self.runner.prepare(batch.chunks, self.blocks)
        result = self.runner.run(inputs)
        for chunk in batch.chunks:
            chunk.seq.num_computed_tokens = chunk.end
            if chunk.start == 0 and chunk.seq.num_preemptions == 0:
                self.stats.prompt_tokens += len(chunk.seq.prompt_ids)
        seqs = [c.seq for c in sampled_chunks]
        tokens, logprobs = sample(result.logits, seqs)
        self.stats.steps += 1
        self.stats.confidence_breaches += result.breaches
        outputs = []
        for seq, token, exit_layer, logprob in zip(seqs, tokens, result.exit_layers, logprobs):
            outputs.append(self._append_token(seq, token, exit_layer, logprob))
        return outputs

    def _append_token(self, seq: Sequence, token: int, exit_layer: int, logprob: dict | None) -> RequestOutput:
        seq.output_ids.append(token)
        seq.exit_layers.append(exit_layer)
        if logprob is not None:
            seq.logprobs.append(logprob)
        self.stats.generation_tokens += 1
        self.stats.tokens_per_exit_layer[exit_layer] += 1
        old_text = seq.output_text
        reason = self._detokenize_and_check_stop(seq, token)
        if reason:
            self.scheduler.finish(seq, reason)
            self.sequences.pop(seq.request_id, None)
        return RequestOutput(
            request_id=seq.request_id, prompt_token_ids=seq.prompt_ids, text=seq.output_text,
            token_ids=list(seq.output_ids), exit_layers=list(seq.exit_layers), finished=seq.finished,
            finish_reason=seq.finish_reason, new_text=seq.output_text[len(old_text):], new_token_ids=[token],
            logprobs=list(seq.logprobs) if seq.params.logprobs is not None else None,
            num_preemptions=seq.num_preemptions,
        )

    def _detokenize_and_check_stop(self, seq: Sequence, token: int) -> str | None:
        p = seq.params
        if self.tokenizer is not None:
            text = self.tokenizer.decode(seq.output_ids, skip_special_tokens=p.skip_special_tokens)
            if not text.endswith("\ufffd"):  # hold back an incomplete UTF-8 character
                seq.output_text = text
            for stop in p.stop:
                at = seq.output_text.find(stop)
                if at >= 0:
                    seq.output_text = seq.output_text[:at]
                    return "stop"
        if token in p.stop_token_ids or (not p.ignore_eos and token in self.eos_ids):
            return "stop"
        if len(seq.output_ids) >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            return "length"
        return None
