"""Every Helios metric, defined once, as plain data (no Ray here).

Names follow vLLM's with a `helios_` prefix, plus what only Helios has (tokens per exit
layer, layers loaded, confidence breaches, the controller's choices, energy). The Ray
metric objects that record them live in `deployments/metrics.py`; the Grafana dashboards
(`telemetry/dashboards.py`) and the Prometheus alert rules (`telemetry/alerts.py`) are
generated from these specs, so a panel can only query a metric defined here.

Ray's metrics agent exports them for Prometheus at `http://NODE:METRICS_EXPORT_PORT/metrics`
(how Ray Serve is scraped; KubeRay's PodMonitor in `k8s/`) and puts its namespace in front:
Prometheus sees `ray_helios_time_to_first_token_seconds`, labelled with `model` plus Ray's
own labels (node, worker). `MetricSpec.series` is that exported name.
"""

from __future__ import annotations

from dataclasses import dataclass

EXPORT_PREFIX = "ray_"  # Ray's exporter prepends its namespace to every user metric

# Who records a metric. Only "serving" metrics exist today; the others are defined so that
# dashboards and alerts can name them, and fill when their component lands.
SERVING, LENGTH, CONTROLLER, ENERGY = "serving", "length_prediction", "controller", "energy"

# vLLM's buckets (seconds)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
               480.0, 960.0, 1920.0, 7680.0)
# tokens per request (vLLM's 1-2-5 series)
TOKEN_COUNT_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)
# |predicted - actual| output tokens; the paper reports a 62-token mean error, 81% within 100.
# Ray's histograms take positive boundaries only, so the sign is the `direction` label.
LENGTH_ERROR_BUCKETS = (1, 8, 16, 32, 64, 100, 128, 256, 512, 1024, 2048, 4096)

COUNTER, GAUGE, HISTOGRAM = "counter", "gauge", "histogram"


@dataclass(frozen=True)
class MetricSpec:
    name: str  # as recorded (Ray metric name); counters end in _total
    kind: str  # counter | gauge | histogram
    help: str
    labels: tuple[str, ...] = ("model",)
    buckets: tuple[float, ...] = ()  # histograms only
    source: str = SERVING  # the component that records it

    @property
    def series(self) -> str:
        """The name Prometheus stores (histograms add _bucket, _sum, _count to it)."""
        return EXPORT_PREFIX + self.name


def _serving(name: str, kind: str, help: str, extra_labels: tuple[str, ...] = (),
             buckets: tuple[float, ...] = ()) -> MetricSpec:
    return MetricSpec(name, kind, help, ("model",) + extra_labels, buckets, SERVING)


METRICS: tuple[MetricSpec, ...] = (
    # request latencies (vLLM's names), observed when a request finishes
    _serving("helios_time_to_first_token_seconds", HISTOGRAM, "Time to first token.", buckets=TTFT_BUCKETS),
    _serving("helios_time_per_output_token_seconds", HISTOGRAM, "Time per output token after the first.",
             buckets=TPOT_BUCKETS),
    _serving("helios_e2e_request_latency_seconds", HISTOGRAM, "End-to-end request latency in the replica.",
             buckets=E2E_BUCKETS),
    _serving("helios_request_success_total", COUNTER, "Finished requests by finish reason.", ("finished_reason",)),
    _serving("helios_request_generation_tokens", HISTOGRAM, "Output tokens per finished request.",
             buckets=TOKEN_COUNT_BUCKETS),
    # engine state after each step
    _serving("helios_num_requests_running", GAUGE, "Requests in the running batch."),
    _serving("helios_num_requests_waiting", GAUGE, "Requests waiting to be scheduled."),
    _serving("helios_kv_cache_usage_perc", GAUGE, "Share of KV-cache blocks in use (0 to 1)."),
    _serving("helios_num_layers_loaded", GAUGE, "Decoder layers loaded in this replica."),
    _serving("helios_model_info", GAUGE, "The model a replica serves (value 1).",
             ("source", "num_layers", "exit_policy")),
    # work done by each step
    _serving("helios_prompt_tokens_total", COUNTER, "Prompt tokens processed."),
    _serving("helios_generation_tokens_total", COUNTER, "Tokens generated."),
    _serving("helios_num_preemptions_total", COUNTER, "Sequences preempted (recomputed later)."),
    _serving("helios_tokens_per_exit_layer_total", COUNTER,
             "Generated tokens by the number of decoder layers they ran.", ("exit_layer",)),
    _serving("helios_confidence_breaches_total", COUNTER,
             "Tokens forced out at the last loaded layer without a confident exit."),
    _serving("helios_requests_handed_off_total", COUNTER,
             "Requests a replica whose choice the controller replaced gave back before producing anything "
             "(the ingress sends them again, to the replacement)."),
    # response-length prediction (filled by requests that carry a predicted length)
    MetricSpec("helios_request_predicted_generation_tokens", HISTOGRAM,
               "Output tokens a length predictor expected, per finished request that had a prediction.",
               ("model",), TOKEN_COUNT_BUCKETS, LENGTH),
    MetricSpec("helios_length_prediction_error_tokens", HISTOGRAM,
               "|predicted - actual| output tokens of finished requests; direction: over (predicted >= actual) "
               "or under.", ("model", "direction"), LENGTH_ERROR_BUCKETS, LENGTH),
    MetricSpec("helios_recomputations_total", COUNTER,
               "Finished requests that outran their predicted length: the ones the paper's static mode "
               "recomputes (FCR); the continuous engine keeps them running, re-estimated.", ("model",),
               source=LENGTH),
    # the HELIOS controller
    MetricSpec("helios_active_model_info", GAUGE,
               "The candidate model and depth the controller has loaded for a served model (value 1).",
               ("model", "candidate", "depth"), source=CONTROLLER),
    MetricSpec("helios_switches_total", COUNTER, "Model or depth changes made by the controller, by reason.",
               ("model", "reason"), source=CONTROLLER),
    MetricSpec("helios_profiling_runs_total", COUNTER, "Live profiling runs of candidate models.", ("model",),
               source=CONTROLLER),
    MetricSpec("helios_controller_apply_failures_total", COUNTER,
               "Failed attempts of the controller to deploy a candidate at a depth (each retry counts).",
               ("model", "candidate", "depth"), source=CONTROLLER),
    # energy, only where a hardware counter exists (telemetry/energy.py); never estimated
    MetricSpec("helios_energy_joules_total", COUNTER,
               "Energy measured by a hardware counter while the replica ran (meter: rapl or nvml).",
               ("model", "meter"), source=ENERGY),
    MetricSpec("helios_energy_per_token_joules", GAUGE,
               "Measured energy per generated token over the last measurement window.", ("model", "meter"),
               source=ENERGY),
)

BY_NAME: dict[str, MetricSpec] = {spec.name: spec for spec in METRICS}


def spec(name: str) -> MetricSpec:
    """The spec of a metric by its recorded name (KeyError names the unknown metric)."""
    return BY_NAME[name]


def series_names() -> set[str]:
    """Every series name Prometheus can hold for these metrics (histograms: _bucket, _sum, _count)."""
    names = set()
    for metric in METRICS:
        suffixes = ("_bucket", "_sum", "_count") if metric.kind == HISTOGRAM else ("",)
        names.update(metric.series + suffix for suffix in suffixes)
    return names

