"""Temporary: the old Ray recorder that diffs the engine's running totals.

Goes as soon as AsyncLLMEngine's on_step passes a StepStats (deployments/metrics.py then records).
"""

from __future__ import annotations

from ray.util.metrics import Counter, Gauge, Histogram

from telemetry.metrics import E2E_BUCKETS as _E2E, TPOT_BUCKETS as _TPOT, TTFT_BUCKETS as _TTFT

TTFT_BUCKETS, TPOT_BUCKETS, E2E_BUCKETS = list(_TTFT), list(_TPOT), list(_E2E)
MODEL = ("model",)


class ServingMetrics:
    """The metrics of one model replica: request latencies, engine state, token counts."""

    def __init__(self, model_id: str, source: str, num_layers_loaded: int, num_layers: int, exit_policy: str):
        self.ttft = Histogram("helios_time_to_first_token_seconds", "Time to first token.",
                              boundaries=TTFT_BUCKETS, tag_keys=MODEL)
        self.tpot = Histogram("helios_time_per_output_token_seconds", "Time per output token after the first.",
                              boundaries=TPOT_BUCKETS, tag_keys=MODEL)
        self.e2e = Histogram("helios_e2e_request_latency_seconds", "End-to-end request latency in the replica.",
                             boundaries=E2E_BUCKETS, tag_keys=MODEL)
        self.running = Gauge("helios_num_requests_running", "Requests in the running batch.", tag_keys=MODEL)
        self.waiting = Gauge("helios_num_requests_waiting", "Requests waiting to be scheduled.", tag_keys=MODEL)
        self.kv_usage = Gauge("helios_kv_cache_usage_perc", "Share of KV-cache blocks in use (0 to 1).",
                              tag_keys=MODEL)
        self.prompt_tokens = Counter("helios_prompt_tokens_total", "Prompt tokens processed.", tag_keys=MODEL)
        self.generation_tokens = Counter("helios_generation_tokens_total", "Tokens generated.", tag_keys=MODEL)
        self.request_success = Counter("helios_request_success_total", "Finished requests by finish reason.",
                                       tag_keys=MODEL + ("finished_reason",))
        self.preemptions = Counter("helios_num_preemptions_total", "Sequences preempted (recomputed later).",
                                   tag_keys=MODEL)
        self.exit_tokens = Counter("helios_tokens_per_exit_layer_total",
                                   "Generated tokens by the number of decoder layers they ran.",
                                   tag_keys=MODEL + ("exit_layer",))
        self.breaches = Counter("helios_confidence_breaches_total",
                                "Tokens forced out at the last loaded layer without a confident exit.",
                                tag_keys=MODEL)
        self.layers_loaded = Gauge("helios_num_layers_loaded", "Decoder layers loaded in this replica.",
                                   tag_keys=MODEL)
        self.model_info = Gauge("helios_model_info", "The model a replica serves (value 1).",
                                tag_keys=MODEL + ("source", "num_layers", "exit_policy"))
        for metric in self._all():
            metric.set_default_tags({"model": model_id})
        self._num_layers_loaded = num_layers_loaded
        self._info_tags = {"source": source, "num_layers": str(num_layers), "exit_policy": exit_policy}
        self._set_static()
        self._seen = {"prompt": 0, "generation": 0, "preemptions": 0, "breaches": 0}
        self._seen_exits: dict[int, int] = {}

    def _set_static(self) -> None:
        # re-set with every step: an exporter may drop a gauge that was set once and never again
        self.layers_loaded.set(self._num_layers_loaded)
        self.model_info.set(1, tags=self._info_tags)

    def _all(self):
        return [v for v in vars(self).values() if isinstance(v, (Counter, Gauge, Histogram))]

    def observe_request(self, ttft: float | None, e2e: float, num_output_tokens: int, finish_reason: str) -> None:
        if ttft is not None:
            self.ttft.observe(ttft)
            if num_output_tokens > 1:
                self.tpot.observe((e2e - ttft) / (num_output_tokens - 1))
        self.e2e.observe(e2e)
        self.request_success.inc(1, tags={"finished_reason": finish_reason})

    def observe_step(self, engine) -> None:
        """Engine state after a step; token counters advance by what the engine counted since."""
        self._set_static()
        self.running.set(len(engine.scheduler.running))
        self.waiting.set(len(engine.scheduler.waiting))
        self.kv_usage.set(engine.blocks.usage)
        stats = engine.stats
        for key, counter, total in (("prompt", self.prompt_tokens, stats.prompt_tokens),
                                    ("generation", self.generation_tokens, stats.generation_tokens),
                                    ("preemptions", self.preemptions, stats.preemptions),
                                    ("breaches", self.breaches, stats.confidence_breaches)):
            if total > self._seen[key]:
                counter.inc(total - self._seen[key])
                self._seen[key] = total
        for layer, count in stats.tokens_per_exit_layer.items():
            seen = self._seen_exits.get(layer, 0)
            if count > seen:
                self.exit_tokens.inc(count - seen, tags={"exit_layer": str(layer)})
                self._seen_exits[layer] = count
