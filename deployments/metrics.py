"""Ray metric objects built from the specs in telemetry/metrics.py, and the recorder of one replica.

`ServingMetrics.observe_step` takes the engine's plain per-step record (helios.stats.StepStats):
gauges follow its state fields, counters advance by the step's own counts. Nothing here
reaches into the engine.
"""

from __future__ import annotations

import ray
from ray.util.metrics import Counter, Gauge, Histogram

from helios.stats import StepStats
from telemetry.energy import EnergyMeter, open_meter
from telemetry.metrics import COUNTER, GAUGE, HISTOGRAM, MetricSpec, spec

_RAY_KIND = {COUNTER: Counter, GAUGE: Gauge, HISTOGRAM: Histogram}


def ray_metric(metric: MetricSpec, default_tags: dict[str, str] | None = None) -> Counter | Gauge | Histogram:
    """The Ray metric object for a spec (Ray exports it as `metric.series`)."""
    options = {"boundaries": list(metric.buckets)} if metric.kind == HISTOGRAM else {}
    recorder = _RAY_KIND[metric.kind](metric.name, metric.help, tag_keys=metric.labels, **options)
    if default_tags:
        recorder.set_default_tags(default_tags)
    return recorder


class ServingMetrics:
    """The metrics of one model replica: request latencies, engine state, token counts, energy."""

    def __init__(self, model_id: str, source: str, num_layers_loaded: int, num_layers: int, exit_policy: str,
                 energy_meter: EnergyMeter | str | None = "auto"):
        """`energy_meter`: "auto" opens the replica's hardware meter (NVML for a GPU replica, RAPL
        otherwise) when the machine has one; None records no energy."""
        model = {"model": model_id}

        def make(name: str) -> Counter | Gauge | Histogram:
            return ray_metric(spec(name), model)

        self.ttft = make("helios_time_to_first_token_seconds")
        self.tpot = make("helios_time_per_output_token_seconds")
        self.e2e = make("helios_e2e_request_latency_seconds")
        self.request_success = make("helios_request_success_total")
        self.running = make("helios_num_requests_running")
        self.waiting = make("helios_num_requests_waiting")
        self.kv_usage = make("helios_kv_cache_usage_perc")
        self.layers_loaded = make("helios_num_layers_loaded")
        self.model_info = make("helios_model_info")
        self.prompt_tokens = make("helios_prompt_tokens_total")
        self.generation_tokens = make("helios_generation_tokens_total")
        self.preemptions = make("helios_num_preemptions_total")
        self.exit_tokens = make("helios_tokens_per_exit_layer_total")
        self.breaches = make("helios_confidence_breaches_total")
        self.handed_off = make("helios_requests_handed_off_total")
        self.generation_length = make("helios_request_generation_tokens")
        self.predicted_length = make("helios_request_predicted_generation_tokens")
        self.length_error = make("helios_length_prediction_error_tokens")
        self.recomputations = make("helios_recomputations_total")
        self._info_tags = {"source": source, "num_layers": str(num_layers), "exit_policy": exit_policy}
        if energy_meter == "auto":
            energy_meter = open_meter(gpu=bool(ray.get_gpu_ids()) if ray.is_initialized() else False)
        self._energy = _EnergyRecorder(energy_meter, model_id) if energy_meter is not None else None
        self._set_static(num_layers_loaded)

    def _set_static(self, num_layers_loaded: int) -> None:
        # re-set with every step: an exporter may drop a gauge that was set once and never again
        self.layers_loaded.set(num_layers_loaded)
        self.model_info.set(1, tags=self._info_tags)

    def observe_request(self, ttft: float | None, e2e: float, num_output_tokens: int, finish_reason: str) -> None:
        if ttft is not None:
            self.ttft.observe(ttft)
            if num_output_tokens > 1:
                self.tpot.observe((e2e - ttft) / (num_output_tokens - 1))
        self.e2e.observe(e2e)
        self.generation_length.observe(num_output_tokens)
        self.request_success.inc(1, tags={"finished_reason": finish_reason})

    def observe_step(self, stats: StepStats) -> None:
        """The engine's state after a step, and the work that step did."""
        self._set_static(stats.num_layers_loaded)
        self.running.set(stats.num_running)
        self.waiting.set(stats.num_waiting)
        self.kv_usage.set(stats.kv_cache_usage)
        # Ray counters refuse inc(0): an idle step adds nothing
        for counter, count in ((self.prompt_tokens, stats.num_prompt_tokens),
                               (self.generation_tokens, stats.num_generation_tokens),
                               (self.preemptions, stats.num_preemptions),
                               (self.breaches, stats.confidence_breaches)):
            if count > 0:
                counter.inc(count)
        for layer, count in stats.tokens_per_exit_layer.items():
            if count > 0:
                self.exit_tokens.inc(count, tags={"exit_layer": str(layer)})
        for request in stats.finished:
            if request.predicted_length is not None:
                self._observe_prediction(request.predicted_length, request.num_output_tokens)
        if self._energy is not None:
            self._energy.observe(stats.num_generation_tokens)

    def _observe_prediction(self, predicted: int, actual: int) -> None:
        self.predicted_length.observe(predicted)
        direction = "over" if predicted >= actual else "under"
        self.length_error.observe(abs(predicted - actual), tags={"direction": direction})
        if actual > predicted:
            self.recomputations.inc(1)


class _EnergyRecorder:
    """Joules from a hardware meter, and joules per generated token over windows of at least `window_s`.

    A window closes at a step once `window_s` has passed and tokens were generated in it; idle
    energy spent in between is charged to the next tokens (the machine spent it serving them).
    """

    def __init__(self, meter: EnergyMeter, model_id: str, window_s: float = 5.0):
        self.meter, self.window_s = meter, window_s
        tags = {"model": model_id, "meter": meter.name}
        self.joules_total = ray_metric(spec("helios_energy_joules_total"), tags)
        self.per_token = ray_metric(spec("helios_energy_per_token_joules"), tags)
        self._last_joules = meter.read_joules()
        self._window_joules, self._window_tokens = 0.0, 0
        self._window_start = meter.clock()

    def observe(self, new_tokens: int) -> None:
        joules = self.meter.read_joules()
        spent = joules - self._last_joules
        self._last_joules = joules
        if spent > 0:
            self.joules_total.inc(spent)
            self._window_joules += spent
        self._window_tokens += new_tokens
        if self._window_tokens and self.meter.clock() - self._window_start >= self.window_s:
            self.per_token.set(self._window_joules / self._window_tokens)
            self._window_joules, self._window_tokens = 0.0, 0
            self._window_start = self.meter.clock()
