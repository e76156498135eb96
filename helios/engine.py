"""The synchronous engine: add requests, step, collect outputs. No Ray, no asyncio.

A step is schedule -> run -> outputs -> update: the scheduler picks the chunks, the model
runner computes them (exits and KV fill included), the output processor turns sampled
tokens into deltas and finish reasons, and the scheduler applies the result. Only the
scheduler changes sequences; each step leaves a `StepStats` record in `last_step`.
"""

from __future__ import annotations

import itertools
import logging
import time

import torch

from helios.block_manager import BlockManager, WindowBlockManager, kv_bytes_per_token, kv_pool_blocks, split_layers
from helios.config import EngineConfig
from helios.cpu_kernels import resolve_decode_kernel
from helios.exits import heads_for_config
from helios.inputs import InputProcessor, Prompt
from helios.length import load_length_head
from helios.loader import load_model
from helios.linears import GGUF_BLOCK_ROWS, pack_linears, resolve_linear_kernel
from helios.policies import make_policy
from helios.outputs import OutputProcessor, RequestOutput
from helios.runner import ModelRunner
from helios.sampler import sample
from helios.sampling_params import SamplingParams
from helios.scheduler import SampledToken, Scheduler, SchedulerOutput
from helios.sequence import Sequence
from helios.stats import EngineStats, StepStats

logger = logging.getLogger("helios")

__all__ = ["LLMEngine", "Prompt", "RequestOutput"]


def _resolve_device(config: EngineConfig) -> str:
    return config.device if config.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")


def _eos_ids(hf_config, tokenizer) -> set[int]:
    ids = getattr(hf_config, "eos_token_id", None)
    ids = set(ids if isinstance(ids, list) else [] if ids is None else [ids])
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def _sample_isolating(logits: torch.Tensor, seqs: list[Sequence]
                      ) -> tuple[list[int | None], list[dict | None], dict[int, Exception]]:
    """`sample` over the batch; if it raises, again row by row, so that only the rows whose own
    params fail get the fault ({row: exception}) and the others the tokens they would have had
    (seeded generators are put back first). If every row of several fails, the fault is not
    one request's: it is raised."""
    generators = [(seq.generator, seq.generator.get_state()) for seq in seqs if seq.generator is not None]
    try:
        tokens, logprobs = sample(logits, seqs)
        return tokens, logprobs, {}
    except Exception as batch_error:
        for generator, state in generators:
            generator.set_state(state)
        tokens, logprobs, faults = [None] * len(seqs), [None] * len(seqs), {}
        for row, seq in enumerate(seqs):
            try:
                (tokens[row],), (logprobs[row],) = sample(logits[row:row + 1], [seq])
            except Exception as exc:
                faults[row] = exc
        if len(seqs) > 1 and len(faults) == len(seqs):
            raise batch_error
        return tokens, logprobs, faults


class LLMEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        device = _resolve_device(config)
        loaded = load_model(config.model, config.max_layers, dtype=config.dtype, device=device)
        self.model, self.arch, self.tokenizer = loaded.model, loaded.arch, loaded.tokenizer
        dtype = self.model.embed_tokens.weight.dtype
        self.num_loaded_layers = self.model.num_loaded_layers
        heads, confidence = heads_for_config(config, self.model)
        self.blocks, self.window_blocks = self._block_managers(dtype.itemsize)
        self.max_model_len = min(config.max_model_len or self.arch.max_position, self.arch.max_position,
                                 self.blocks.num_blocks * config.block_size)  # the full-attention pool's tokens
        logger.info("loaded %s: %d of %d layers on %s/%s; KV cache: %s",
                    loaded.source, self.num_loaded_layers, self.arch.num_layers, device, str(dtype).split(".")[-1],
                    self._describe_kv(dtype.itemsize))
        self.linear_kernel = resolve_linear_kernel(config.linear_kernel, device, dtype, config.compile_layers)
        if self.linear_kernel in ("onednn", "gguf"):  # reordered once here: every step reads the packed weights
            swapped, blocked = pack_linears(self.model, config.max_num_seqs, self.linear_kernel)
            if self.linear_kernel == "gguf":
                logger.info("linear layers on GGUF blocks for calls of at most %d rows: %d of %d",
                            GGUF_BLOCK_ROWS, blocked, swapped)
        self.runner = ModelRunner(self.model, self.blocks.num_blocks, config.block_size, heads, config.exit_policy,
                                  confidence, config.exit_profile, config.seed,
                                  self.window_blocks.num_blocks if self.window_blocks else 0,
                                  resolve_decode_kernel(config.decode_kernel, device, self.arch.head_dim))
        logger.info("decode attention: %s; linear layers: %s", self.runner.decode_kernel, self.linear_kernel)
        if config.compile_layers:  # compiled and warmed up here, so the first request does not pay for it
            logger.info("compiled the layers in %.1f s", self.runner.compile_layers())
        self.scheduler = Scheduler(self.blocks, config.max_num_seqs, config.max_num_batched_tokens,
                                   make_policy(config.scheduling_policy, self.blocks, config.length_aging,
                                               config.length_lookahead, self.window_blocks),
                                   self.window_blocks)
        if config.length_head:
            self.runner.length_head = load_length_head(config.length_head, self.arch.hidden_size, self.arch.num_layers)
            if max(self.runner.length_head.layers) > self.num_loaded_layers:
                raise ValueError(f"the length head reads layers {self.runner.length_head.layers}; only "
                                 f"{self.num_loaded_layers} are loaded (max_layers)")
            self.runner.capture_layers = frozenset(self.runner.length_head.layers)
        # length-tune records the first-token states here: fn(sequences, {layer: states})
        self.length_recorder = None
        self.inputs = InputProcessor(self.tokenizer, self.arch.vocab_size, self.max_model_len)
        self.outputs = OutputProcessor(self.tokenizer, _eos_ids(loaded.hf_config, self.tokenizer), self.max_model_len)
        self.sequences: dict[str, Sequence] = {}
        self.stats = EngineStats()
        self.last_step: StepStats = self.idle_stats()
        self._ids = itertools.count()

    def _block_managers(self, dtype_bytes: int) -> tuple[BlockManager, WindowBlockManager | None]:
        """The full-attention pool, and the sliding-window pool when the loaded layers mix both kinds."""
        config, windows = self.config, [layer.sliding_window for layer in self.model.layers]
        # sequences that hold KV at once: the decoding ones, plus those spf policies park
        slots = config.max_num_seqs + (config.length_lookahead if config.scheduling_policy != "fcfs" else 0)
        sizes = kv_pool_blocks(config.kv_cache_memory, config.block_size, self._kv_bytes_per_token(1, dtype_bytes),
                               windows, slots, config.max_num_batched_tokens)
        window = (WindowBlockManager(sizes.window_blocks, config.block_size, max(w for w in windows if w))
                  if sizes.window_blocks else None)
        return BlockManager(sizes.blocks, config.block_size), window

    def _kv_bytes_per_token(self, num_layers: int, dtype_bytes: int) -> int:
        return kv_bytes_per_token(num_layers, self.arch.num_kv_heads, self.arch.head_dim, dtype_bytes)

    def _describe_kv(self, dtype_bytes: int) -> str:
        """The pools' sizes, for the start-up log."""
        def pool(blocks: BlockManager, layers: int) -> str:
            tokens = blocks.num_blocks * blocks.block_size
            return (f"{blocks.num_blocks} blocks x {blocks.block_size} tokens = {tokens} tokens x {layers} layers "
                    f"({tokens * self._kv_bytes_per_token(layers, dtype_bytes) / 2**20:.0f} MiB)")

        if self.window_blocks is None:
            return pool(self.blocks, self.num_loaded_layers)
        full, window = split_layers([layer.sliding_window for layer in self.model.layers])
        return (f"full layers: {pool(self.blocks, len(full))}; window layers (window {self.window_blocks.window}, "
                f"blocks freed as it slides): {pool(self.window_blocks, len(window))}")

    @property
    def kv_cache_usage(self) -> float:
        """Share of KV blocks in use, 0 to 1: the fuller pool's, since either one running out preempts."""
        if self.window_blocks is None:
            return self.blocks.usage
        return max(self.blocks.usage, self.window_blocks.usage)

    # ---- requests -----------------------------------------------------------------

    def encode(self, prompt: Prompt) -> list[int]:
        return self.inputs.encode(prompt)

    def make_sequence(self, prompt: Prompt, params: SamplingParams | None = None,
                      request_id: str | None = None) -> Sequence:
        """Validate a request into a Sequence without touching engine state (safe from any thread)."""
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        if request_id in self.sequences:
            raise ValueError(f"request id {request_id!r} is already in use")
        return self.inputs.make_sequence(prompt, params or SamplingParams(), request_id)

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
        self.outputs.add(seq)
        self.scheduler.add(seq)

    def abort(self, request_id: str, reason: str = "abort") -> None:
        """Drop a request and free its KV blocks (unknown or finished ids are ignored)."""
        seq = self.sequences.pop(request_id, None)
        if seq is not None:
            self.outputs.remove(request_id)
            self.scheduler.finish(seq, reason)

    def release_unstarted(self, keep: frozenset[str] = frozenset()) -> list[str]:
        """Drop every request that waits and has produced nothing yet (ids in `keep` excepted); return
        their ids. A replica being replaced hands these to its successor: no token of theirs has left
        this engine, so a client sees nothing of the move but the wait."""
        released = [seq.request_id for seq in self.scheduler.waiting
                    if not seq.output_ids and seq.request_id not in keep]
        for request_id in released:
            self.abort(request_id, "handed_off")
        return released

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    # ---- the step -----------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one iteration; return a delta for each request that got a token."""
        start = time.perf_counter()
        batch = self.scheduler.schedule()
        outputs, sampled, exit_layers, breaches, faults = [], [], [], 0, {}
        if not batch.empty:
            inputs, sampled_chunks = self.runner.prepare(batch.chunks)
            result = self.runner.run(inputs)
            seqs = [c.seq for c in sampled_chunks]
            tokens, logprobs, faults = _sample_isolating(result.logits, seqs)
            predicted = result.predicted_lengths
            for i, (seq, token, exit_layer, logprob) in enumerate(zip(seqs, tokens, result.exit_layers, logprobs)):
                if i in faults:
                    continue
                try:
                    out = self.outputs.process(seq, token, exit_layer, logprob)
                except Exception as exc:  # this request's own fault (detokenizer, stop check): it alone ends
                    faults[i] = exc
                    continue
                if i in predicted:
                    out.predicted_length = predicted[i]
                outputs.append(out)
                sampled.append(SampledToken(seq, token, exit_layer, logprob, out.finish_reason, predicted.get(i)))
            if self.length_recorder is not None and result.length_states:
                self.length_recorder([seqs[i] for i in inputs.first_rows], result.length_states)
            exit_layers = [layer for i, layer in enumerate(result.exit_layers) if i not in faults]
            breaches = result.breaches
        self.scheduler.update(batch, sampled, time.monotonic())
        if faults:
            outputs += [self._fail(seqs[i], exc) for i, exc in faults.items()]
        for out in outputs:
            if out.finished:
                self.sequences.pop(out.request_id, None)
        self.last_step = self._step_stats(batch, exit_layers, breaches, time.perf_counter() - start)
        if not batch.empty or batch.preempted:
            self.stats.add(self.last_step)
        return outputs

    def _fail(self, seq: Sequence, exc: Exception) -> RequestOutput:
        """End one request whose own processing raised, free its blocks, and say why in its output.
        The forward pass is shared by the batch, so a fault there is not attributed: it fails the step."""
        logger.error("request %s failed (the engine goes on): %s", seq.request_id, exc, exc_info=exc)
        out = self.outputs.fail(seq, f"{type(exc).__name__}: {exc}")
        self.scheduler.finish(seq, "error")
        return out

    def _step_stats(self, batch: SchedulerOutput, exit_layers: list[int], breaches: int,
                    seconds: float) -> StepStats:
        first_prompts = sum(len(c.seq.prompt_ids) for c in batch.chunks if c.start == 0 and c.seq.num_preemptions == 0)
        per_layer: dict[int, int] = {}
        for layer in exit_layers:
            per_layer[layer] = per_layer.get(layer, 0) + 1
        return StepStats(
            step_time_s=seconds, num_prompt_tokens=first_prompts, num_generation_tokens=len(exit_layers),
            tokens_per_exit_layer=per_layer, confidence_breaches=breaches, num_preemptions=len(batch.preempted),
            num_running=len(self.scheduler.running), num_waiting=len(self.scheduler.waiting),
            kv_cache_usage=self.kv_cache_usage, num_layers_loaded=self.num_loaded_layers,
            finished=tuple(self.scheduler.take_finished()))

    def idle_stats(self) -> StepStats:
        """A record of no work with the engine's state now (requests aborted meanwhile included)."""
        return self._step_stats(SchedulerOutput(), [], 0, 0.0)
