"""Prometheus alert rules for Helios's SLOs, generated from the metric specs.

    python -m telemetry.alerts --out k8s/          # the defaults below
    python -m telemetry.alerts --out k8s/ --ttft-p95-s 1 --tpot-p95-s 0.05

writes `k8s/prometheus/helios-rules.yaml` (a plain rules file: `promtool check rules`, or a
Prometheus without the operator) and `k8s/prometheusrule.yaml` (the same groups as a
Prometheus-operator PrometheusRule). Queries name metrics through their specs; the only
metric not defined by Helios is Ray Serve's own replica health gauge.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import yaml

from telemetry.metrics import spec

# Ray Serve's controller exports it per replica (1 healthy, 0 not) or, with
# RAY_SERVE_CONTROLLER_METRICS_INCLUDE_HIGH_CARDINALITY_TAGS=0, as a count per deployment
SERVE_REPLICA_HEALTHY = "ray_serve_deployment_replica_healthy"
HELIOS_DEPLOYMENTS = 'deployment=~"LLMServer:.*"'  # deployments/app.py's server_name()
WINDOW = "5m"
RULES_FILE, PROMETHEUS_RULE = Path("prometheus/helios-rules.yaml"), Path("prometheusrule.yaml")


@dataclass(frozen=True)
class SLOTargets:
    ttft_p95_s: float = 2.0
    tpot_p95_s: float = 0.2
    # share of generated tokens forced out at the last loaded layer; HELIOS re-assesses a model
    # when more than 50 of 100 tokens breach
    breach_share: float = 0.5
    waiting_requests: int = 1  # requests queued in a replica's engine, sustained for `for`


def _p95(name: str) -> str:
    bucket = f"{spec(name).series}_bucket"
    return f"histogram_quantile(0.95, sum by (model, le) (rate({bucket}[{WINDOW}])))"


def _rate(name: str) -> str:
    return f"sum by (model) (rate({spec(name).series}[{WINDOW}]))"


def _alert(name: str, expr: str, for_: str, severity: str, summary: str, description: str) -> dict:
    return {"alert": name, "expr": expr, "for": for_, "labels": {"severity": severity},
            "annotations": {"summary": summary, "description": description}}


def rule_groups(targets: SLOTargets = SLOTargets()) -> list[dict]:
    """The rule groups, as Prometheus's rules file holds them."""
    slo = [
        _alert("HeliosTTFTP95High", f"{_p95('helios_time_to_first_token_seconds')} > {targets.ttft_p95_s}", "5m",
               "warning", "p95 time to first token of {{ $labels.model }} above " f"{targets.ttft_p95_s}s",
               "p95 TTFT over 5m is {{ $value | humanizeDuration }}. Add replicas or lower the load."),
        _alert("HeliosTPOTP95High", f"{_p95('helios_time_per_output_token_seconds')} > {targets.tpot_p95_s}", "5m",
               "warning", "p95 time per output token of {{ $labels.model }} above " f"{targets.tpot_p95_s}s",
               "p95 TPOT over 5m is {{ $value | humanizeDuration }}. Smaller batches or more replicas help."),
        _alert("HeliosConfidenceBreachRateHigh",
               f"{_rate('helios_confidence_breaches_total')} / {_rate('helios_generation_tokens_total')}"
               f" > {targets.breach_share}", "10m", "warning",
               "{{ $labels.model }}: many tokens leave at the last loaded layer unconfident",
               "{{ $value | humanizePercentage }} of generated tokens breach: load more layers or "
               "switch model (the controller does this when it runs)."),
        _alert("HeliosQueueSaturated",
               f"sum by (model) ({spec('helios_num_requests_waiting').series}) >= {targets.waiting_requests}",
               "5m", "warning", "{{ $labels.model }} keeps requests waiting",
               "{{ $value }} requests have waited in the engine for 5m: the batch or the KV cache is full. "
               "Add replicas or KV memory."),
    ]
    availability = [
        _alert("HeliosReplicaDown",
               f"sum by (application, deployment) ({SERVE_REPLICA_HEALTHY}{{{HELIOS_DEPLOYMENTS}}}) == 0", "1m",
               "critical", "{{ $labels.deployment }} has no healthy replica",
               "Ray Serve reports no healthy replica of this model: its requests fail or queue."),
        _alert("HeliosMetricsAbsent", f"absent({spec('helios_model_info').series})", "10m", "critical",
               "No Helios replica exports metrics",
               "Prometheus sees no helios_model_info series: no replica is up, or scraping "
               "(the PodMonitor) does not reach the Ray pods."),
    ]
    return [{"name": "helios-slo", "rules": slo}, {"name": "helios-availability", "rules": availability}]


def rules_file(targets: SLOTargets = SLOTargets()) -> str:
    return _dump({"groups": rule_groups(targets)})


def prometheus_rule(targets: SLOTargets = SLOTargets()) -> str:
    """The groups as a Prometheus-operator PrometheusRule (picked up by a Prometheus whose
    ruleSelector matches its labels; kube-prometheus-stack's default is release: <its name>)."""
    manifest = {"apiVersion": "monitoring.coreos.com/v1", "kind": "PrometheusRule",
                "metadata": {"name": "helios-alerts", "labels": {"app.kubernetes.io/name": "helios",
                                                                 "release": "prometheus"}},
                "spec": {"groups": rule_groups(targets)}}
    return _dump(manifest)


def _dump(data: dict) -> str:
    header = "# Generated by `python -m telemetry.alerts --out k8s/` from telemetry/metrics.py; do not edit.\n"
    return header + yaml.safe_dump(data, sort_keys=False, width=120)


def write_all(out: Path, targets: SLOTargets = SLOTargets()) -> list[Path]:
    written = []
    for relative, text in ((RULES_FILE, rules_file(targets)), (PROMETHEUS_RULE, prometheus_rule(targets))):
        path = out / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m telemetry.alerts", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("k8s"), help="folder of the k8s manifests")
    defaults = SLOTargets()
    for field, value in vars(defaults).items():
        parser.add_argument("--" + field.replace("_", "-"), type=type(value), default=value)
    args = parser.parse_args(argv)
    targets = SLOTargets(**{field: getattr(args, field) for field in vars(defaults)})
    for path in write_all(args.out, targets):
        print(path)


if __name__ == "__main__":
    main()
