"""Grafana dashboards generated from the metric specs (telemetry/metrics.py).

    python -m telemetry.dashboards --out k8s/dashboards/

writes one JSON file per dashboard (Grafana's dashboard JSON model), the files that
`k8s/kustomization.yaml` puts into a ConfigMap labelled `grafana_dashboard: "1"` for
Grafana's sidecar. Every query is built from a `MetricSpec` (its exported series name), so
a panel cannot name a metric that is not defined; tests/test_telemetry.py checks
that the committed files are current, and tests/test_prometheus.py evaluates every panel's
PromQL against a real Prometheus scraping a running Helios.

The JSON model is written directly (a dict per panel) rather than through a builder
library: a dashboard here is a list of rows of panels with one query each, and the
check that matters, that each query returns data, is made against Prometheus itself.
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass
from pathlib import Path

from telemetry.metrics import BY_NAME, HISTOGRAM, MetricSpec, spec

MODEL = 'model=~"$model"'  # the dashboard's model variable
RATE = "$__rate_interval"  # Grafana's rate window (at least four scrape intervals)
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


@dataclass(frozen=True)
class Target:
    expr: str
    legend: str


@dataclass(frozen=True)
class Panel:
    title: str
    targets: tuple[Target, ...]
    unit: str = "short"
    kind: str = "timeseries"  # timeseries | heatmap | table
    description: str = ""

    def metrics(self) -> set[MetricSpec]:
        """The specs this panel's queries read."""
        return {BY_NAME[name] for target in self.targets for name in referenced_metrics(target.expr)}

    def sources(self) -> set[str]:
        """The components that must run for this panel to show data."""
        return {metric.source for metric in self.metrics()}


@dataclass(frozen=True)
class Row:
    title: str
    panels: tuple[Panel, ...]


@dataclass(frozen=True)
class Dashboard:
    uid: str
    title: str
    rows: tuple[Row, ...]

    def panels(self) -> list[Panel]:
        return [panel for row in self.rows for panel in row.panels]


_SERIES = re.compile(r"\bray_(helios_\w+)")
_HISTOGRAM_SUFFIX = re.compile(r"_(bucket|sum|count)$")


def referenced_metrics(expr: str) -> set[str]:
    """Recorded names of the metrics a PromQL expression reads (ray_helios_x_bucket -> helios_x).

    A name that matches no spec is returned as written, so a check against the specs fails on it.
    """
    names = set()
    for match in _SERIES.finditer(expr):
        name = match.group(1)
        base = _HISTOGRAM_SUFFIX.sub("", name)
        if name not in BY_NAME and base in BY_NAME and BY_NAME[base].kind == HISTOGRAM:
            name = base
        names.add(name)
    return names


# ---- query builders: every one starts from a spec, so the name is checked where it is built ----

def _series(name: str, suffix: str = "") -> str:
    metric = spec(name)
    if suffix and metric.kind != HISTOGRAM:
        raise ValueError(f"{name} is a {metric.kind}, not a histogram")
    return f"{metric.series}{suffix}{{{MODEL}}}"


def quantile(name: str, q: float, by: str = "") -> Target:
    group = ", ".join(filter(None, ("le", by)))
    expr = f"histogram_quantile({q}, sum by ({group}) (rate({_series(name, '_bucket')}[{RATE}])))"
    return Target(expr, f"p{round(q * 100)}" + (f" {{{{{by}}}}}" if by else ""))


def rate(name: str, by: str = "model", legend: str = "") -> Target:
    return Target(f"sum by ({by}) (rate({_series(name)}[{RATE}]))", legend or f"{{{{{by}}}}}")


def gauge(name: str, by: str = "model", legend: str = "") -> Target:
    return Target(f"sum by ({by}) ({_series(name)})", legend or f"{{{{{by}}}}}")


def histogram_mean(name: str, legend: str) -> Target:
    expr = (f"sum(rate({_series(name, '_sum')}[{RATE}])) / sum(rate({_series(name, '_count')}[{RATE}]))")
    return Target(expr, legend)


def _latency(name: str, title: str) -> Panel:
    return Panel(title, tuple(quantile(name, q, by="model") for q in (0.5, 0.95, 0.99)), unit="s",
                 description=spec(name).help)


SERVING = Dashboard("helios-serving", "Helios serving", (
    Row("Latency", (
        _latency("helios_time_to_first_token_seconds", "Time to first token"),
        _latency("helios_time_per_output_token_seconds", "Time per output token"),
        _latency("helios_e2e_request_latency_seconds", "End-to-end latency"),
    )),
    Row("Throughput", (
        Panel("Tokens per second", (rate("helios_prompt_tokens_total", legend="prompt {{model}}"),
                                    rate("helios_generation_tokens_total", legend="generated {{model}}")),
              unit="short"),
        Panel("Finished requests per second", (rate("helios_request_success_total", by="model, finished_reason",
                                                    legend="{{model}} {{finished_reason}}"),), unit="reqps"),
    )),
    Row("Engine", (
        Panel("Running and waiting requests", (gauge("helios_num_requests_running", legend="running {{model}}"),
                                               gauge("helios_num_requests_waiting", legend="waiting {{model}}"))),
        Panel("KV-cache usage", (Target(f"max by (model) ({_series('helios_kv_cache_usage_perc')})",
                                        "{{model}}"),), unit="percentunit"),
        Panel("Preemptions per second", (rate("helios_num_preemptions_total"),)),
    )),
    Row("Early exits", (
        Panel("Generated tokens per exit layer", (rate("helios_tokens_per_exit_layer_total", by="exit_layer"),),
              kind="heatmap", description="Decoder layers each generated token ran, as a share of the rate."),
        Panel("Confidence breaches per second", (rate("helios_confidence_breaches_total"),),
              description=spec("helios_confidence_breaches_total").help),
    )),
    Row("Model and depth", (
        Panel("Layers loaded", (gauge("helios_num_layers_loaded", by="model", legend="{{model}}"),)),
        Panel("Served models", (gauge("helios_model_info", by="model, source, num_layers, exit_policy",
                                      legend="{{model}} {{source}} {{num_layers}} {{exit_policy}}"),),
              kind="table"),
        Panel("Active model (controller)", (gauge("helios_active_model_info", by="model, candidate, depth",
                                                  legend="{{model}}: {{candidate}} @ {{depth}}"),),
              description="Fills when the controller runs."),
        Panel("Switches by reason (controller)", (rate("helios_switches_total", by="model, reason",
                                                       legend="{{model}} {{reason}}"),),
              description="Fills when the controller runs."),
        Panel("Profiling runs (controller)", (rate("helios_profiling_runs_total"),),
              description="Fills when the controller runs."),
        Panel("Requests handed off per second", (rate("helios_requests_handed_off_total"),),
              description="Unstarted requests a replaced replica gave to its replacement; fills during switches."),
        Panel("Apply failures (controller)", (rate("helios_controller_apply_failures_total",
                                                   by="model, candidate, depth",
                                                   legend="{{model}}: {{candidate}} @ {{depth}}"),),
              description="Failed redeploys, each retry counted; fills when one fails."),
    )),
    Row("Response length", (
        Panel("Output tokens per request", (quantile("helios_request_generation_tokens", 0.5),
                                            quantile("helios_request_generation_tokens", 0.95))),
        Panel("Predicted vs actual length", (histogram_mean("helios_request_predicted_generation_tokens",
                                                            "predicted (mean)"),
                                             histogram_mean("helios_request_generation_tokens", "actual (mean)")),
              description="Fills when a length predictor runs."),
        Panel("Length prediction error", (quantile("helios_length_prediction_error_tokens", 0.5, by="direction"),
                                          quantile("helios_length_prediction_error_tokens", 0.9, by="direction")),
              description="Fills when a length predictor runs."),
        Panel("Recomputations per second", (rate("helios_recomputations_total"),),
              description="Fills when length-aware scheduling recomputes requests."),
    )),
    Row("Energy", (
        Panel("Energy per generated token", (gauge("helios_energy_per_token_joules", by="model, meter",
                                                   legend="{{model}} ({{meter}})"),), unit="joule",
              description="Only where a hardware counter exists (RAPL or NVML); never estimated."),
        Panel("Power", (rate("helios_energy_joules_total", by="model, meter", legend="{{model}} ({{meter}})"),),
              unit="watt", description="Only where a hardware counter exists (RAPL or NVML)."),
    )),
))

DASHBOARDS: tuple[Dashboard, ...] = (SERVING,)


# ---- Grafana's JSON model ------------------------------------------------------------------

def _panel_json(panel: Panel, panel_id: int, x: int, y: int, width: int) -> dict:
    body = {
        "id": panel_id, "type": panel.kind, "title": panel.title, "description": panel.description,
        "datasource": DATASOURCE, "gridPos": {"h": 8, "w": width, "x": x, "y": y},
        "targets": [{"refId": chr(ord("A") + i), "datasource": DATASOURCE, "expr": t.expr,
                     "legendFormat": t.legend, "range": panel.kind != "table", "instant": panel.kind == "table",
                     **({"format": "heatmap"} if panel.kind == "heatmap" else {})}
                    for i, t in enumerate(panel.targets)],
        "fieldConfig": {"defaults": {"unit": panel.unit}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True}},
    }
    if panel.kind == "heatmap":
        body["options"] = {"calculate": False, "yAxis": {"axisLabel": "exit layer"},
                           "cellValues": {"unit": "short"}, "color": {"scheme": "Oranges", "mode": "scheme"}}
    return body


def _templating() -> dict:
    model_query = f"label_values({spec('helios_model_info').series}, model)"
    return {"list": [
        {"name": "datasource", "label": "Prometheus", "type": "datasource", "query": "prometheus",
         "current": {}, "hide": 0},
        {"name": "model", "label": "Model", "type": "query", "datasource": DATASOURCE,
         "query": {"query": model_query, "refId": "model"}, "definition": model_query, "refresh": 2,
         "includeAll": True, "multi": True, "allValue": ".*", "current": {}, "sort": 1},
    ]}


def to_grafana(dashboard: Dashboard) -> dict:
    """Grafana's dashboard JSON model: a row header, then its panels three to a line."""
    panels, y, next_id = [], 0, 1
    for row in dashboard.rows:
        panels.append({"id": next_id, "type": "row", "title": row.title, "collapsed": False, "panels": [],
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}})
        next_id, y = next_id + 1, y + 1
        per_line = min(3, len(row.panels))
        width = 24 // per_line
        for i, panel in enumerate(row.panels):
            x = (i % per_line) * width
            if i and i % per_line == 0:
                y += 8
            panels.append(_panel_json(panel, next_id, x, y, width))
            next_id += 1
        y += 8
    return {
        "uid": dashboard.uid, "title": dashboard.title, "tags": ["helios", "ray-serve"], "editable": True,
        "schemaVersion": 39, "graphTooltip": 1, "refresh": "10s", "time": {"from": "now-1h", "to": "now"},
        "timezone": "", "templating": _templating(), "annotations": {"list": []}, "panels": panels,
    }


def render(dashboard: Dashboard) -> str:
    """The file text for a dashboard (stable: sorted keys, fixed indent, final newline)."""
    return json.dumps(to_grafana(dashboard), indent=2, sort_keys=True) + "\n"


def file_name(dashboard: Dashboard) -> str:
    return f"{dashboard.uid}.json"


def write_all(out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for dashboard in DASHBOARDS:
        path = out / file_name(dashboard)
        path.write_text(render(dashboard))
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m telemetry.dashboards", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("k8s/dashboards"), help="folder for the JSON files")
    for path in write_all(parser.parse_args(argv).out):
        print(path)


if __name__ == "__main__":
    main()
