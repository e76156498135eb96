"""`LLMServer`: one engine per Serve replica, requests streamed back as they decode."""

from __future__ import annotations

import logging
import time
from typing import AsyncIterator

import torch
from ray import serve

from deployments.autoscaling import TTFT_METRIC, TTFTWindow
from deployments.config import ModelConfig
from helios.async_engine import AsyncLLMEngine, RequestHandedOff
from helios.engine import LLMEngine
from helios.inputs import Prompt
from helios.outputs import RequestOutput
from helios.sampling_params import SamplingParams
from helios.stats import StepStats
from deployments.metrics import ServingMetrics
from deployments.stats_forwarder import StatsForwarder

logger = logging.getLogger("helios.serve")


def tokens_per_chunk(stream_interval: int, running: int, chunks_per_step: int) -> int:
    """Tokens a streamed chunk waits for: `stream_interval`, raised while many requests run so
    that the replica sends about `chunks_per_step` chunks per engine step in all (0: never raised).

    Every chunk costs serialization and two process hops on the way to the client, paid on the
    CPU the engine runs on; bounding chunks per step bounds that cost at any load.
    """
    if chunks_per_step <= 0:
        return stream_interval
    return max(stream_interval, -(-running // chunks_per_step))


@serve.deployment
class LLMServer:
    def __init__(self, model: ModelConfig):
        # Ray sets OMP_NUM_THREADS from the replica's CPUs; make torch follow it explicitly
        torch.set_num_threads(max(1, int(model.num_cpus)))
        self.model = model
        engine = LLMEngine(model.engine_config())
        self.metrics = ServingMetrics(model.id, model.source, engine.num_loaded_layers, engine.arch.num_layers,
                                      model.engine.exit_policy)
        self.engine = AsyncLLMEngine(engine, on_step=self._on_step)
        # under a HELIOS controller the steps also go to it, in batches sent by a thread of their own;
        # once the controller's choice has moved on, this replica hands back what it has not started
        self.forwarder = None if model.controller is None else StatsForwarder(
            model.controller, on_superseded=self._superseded)
        self.created = int(time.time())
        # the autoscaling policy's latency signal, over the window Serve averages it over
        window_s = model.autoscaling.look_back_period_s if model.autoscaling is not None else 30.0
        self.ttft_window = TTFTWindow(window_s)

    async def generate(self, prompt: Prompt, params: SamplingParams, may_hand_off: bool = False) -> AsyncIterator[dict]:
        """Stream one request as deltas (see `_delta`); the first item is {"error": ...} for bad input.

        With `may_hand_off`, a replica the controller has replaced answers {"handed_off": true} and
        nothing else, at once or while the request still waits with nothing produced: the caller
        sends it again, and Serve routes it to the replacement. Serve cancels this generator when the
        caller goes away; the engine then aborts the request and frees its KV blocks.
        """
        start, first_token_at = time.monotonic(), None
        stream = self.engine.generate(prompt, params, tokens_per_output=self._tokens_per_chunk,
                                      may_hand_off=may_hand_off)
        ttft_key = self.ttft_window.started()
        try:
            async for out in stream:
                if first_token_at is None:
                    first_token_at = time.monotonic()
                    self.ttft_window.first_token(ttft_key)
                yield self._delta(out)
                if out.finished:
                    self.metrics.observe_request(first_token_at - start, time.monotonic() - start,
                                                 out.num_output_tokens, out.finish_reason or "stop")
        except (ValueError, TypeError) as exc:  # raised by validation, before anything was queued
            yield {"error": str(exc)}
        except RequestHandedOff:
            self.metrics.handed_off.inc(1)
            yield {"handed_off": True}
        finally:
            self.ttft_window.ended(ttft_key)
            await stream.aclose()

    def _superseded(self, superseded: bool) -> None:  # in the forwarder's thread
        if superseded:
            logger.info("%s (%s): another choice is up; handing unstarted requests to it", self.model.id,
                        self.model.controller.tag)
        else:
            logger.warning("%s (%s): the choice that replaced this one is gone; serving again", self.model.id,
                           self.model.controller.tag)
        self.engine.retire(superseded)

    def _on_step(self, stats: StepStats) -> None:  # in the engine thread: records and appends only
        self.metrics.observe_step(stats)
        if self.forwarder is not None:
            self.forwarder.observe(stats)

    def _tokens_per_chunk(self) -> int:
        return tokens_per_chunk(self.model.stream_interval, self.engine.num_running, self.model.stream_chunks_per_step)

    def _delta(self, out: RequestOutput) -> dict:
        delta = {"text": out.new_text, "token_ids": out.new_token_ids, "exit_layers": out.new_exit_layers,
                 "finished": out.finished, "finish_reason": out.finish_reason,
                 "prompt_tokens": out.num_prompt_tokens, "completion_tokens": out.num_output_tokens}
        if out.predicted_length is not None:  # the length head's prediction (first and last delta)
            delta["predicted_length"] = out.predicted_length
        if out.new_logprobs is not None:
            delta["logprobs"] = [self._named_logprob(entry) for entry in out.new_logprobs]
        return delta

    def _named_logprob(self, entry: dict) -> dict:
        """Token ids -> token strings, for OpenAI's logprobs fields."""
        name = self._token_text
        return {"token": name(entry["token_id"]), "logprob": entry["logprob"],
                "top": [(name(token_id), logprob) for token_id, logprob in entry["top"]]}

    def _token_text(self, token_id: int) -> str:
        tokenizer = self.engine.engine.tokenizer
        return tokenizer.decode([token_id]) if tokenizer is not None else str(token_id)

    def model_card(self) -> dict:
        engine = self.engine.engine
        return {"id": self.model.id, "object": "model", "created": self.created, "owned_by": "helios",
                "source": self.model.source, "max_model_len": engine.max_model_len,
                "num_layers_loaded": engine.num_loaded_layers, "num_layers": engine.arch.num_layers,
                "exit_policy": self.model.engine.exit_policy}

    def engine_state(self) -> dict:
        """What the engine holds now (for tests and debugging)."""
        engine = self.engine.engine
        return {"running": len(engine.scheduler.running), "waiting": len(engine.scheduler.waiting),
                "free_blocks": len(engine.blocks.free_blocks), "num_blocks": engine.blocks.num_blocks}

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve's custom autoscaling metrics API: called on each replica every metrics interval
        when the model autoscales; the `helios` policy reads the TTFT signal from it. (Async: it
        runs on the event loop that `generate` updates the window from.)"""
        return {TTFT_METRIC: self.ttft_window.value()}

    def check_health(self) -> None:
        if self.engine.failed is not None:
            raise RuntimeError(f"the engine failed: {self.engine.failed!r}")
