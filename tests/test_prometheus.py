"""Alert rules checked by promtool, and every dashboard panel evaluated by a real Prometheus
scraping a running Helios (Debian's `prometheus` package ships both binaries; .ci/run installs it)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from telemetry import alerts
from telemetry.dashboards import referenced_metrics
from telemetry.metrics import BY_NAME

REPO = Path(__file__).parents[1]
K8S = REPO / "k8s"
NO_PROMETHEUS = "Prometheus is not installed: apt-get install -y prometheus (gives prometheus and promtool)"


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(NO_PROMETHEUS)
    return path


def test_committed_rules_are_current():
    assert (K8S / alerts.RULES_FILE).read_text() == alerts.rules_file(), \
        "stale: run python -m telemetry.alerts --out k8s/"
    assert (K8S / alerts.PROMETHEUS_RULE).read_text() == alerts.prometheus_rule()
    rule = yaml.safe_load((K8S / alerts.PROMETHEUS_RULE).read_text())
    assert rule["spec"]["groups"] == yaml.safe_load((K8S / alerts.RULES_FILE).read_text())["groups"]


def test_alerts_query_defined_metrics():
    names = {rule["alert"] for group in alerts.rule_groups() for rule in group["rules"]}
    assert {"HeliosTTFTP95High", "HeliosTPOTP95High", "HeliosConfidenceBreachRateHigh", "HeliosQueueSaturated",
            "HeliosReplicaDown"} <= names
    for group in alerts.rule_groups():
        for rule in group["rules"]:
            used = referenced_metrics(rule["expr"])
            assert used <= set(BY_NAME), (rule["alert"], used - set(BY_NAME))
            assert used or alerts.SERVE_REPLICA_HEALTHY in rule["expr"], rule["alert"]


def test_promtool_checks_and_unit_tests_the_rules():
    promtool = _tool("promtool")
    subprocess.run([promtool, "check", "rules", str(K8S / alerts.RULES_FILE)], check=True, capture_output=True)
    result = subprocess.run([promtool, "test", "rules", str(REPO / "tests/promtool/helios-alerts.test.yaml")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_rejects_a_broken_rule(tmp_path):
    """The check above can fail: a rule with bad PromQL is refused."""
    promtool = _tool("promtool")
    broken = tmp_path / "broken.yaml"
    broken.write_text(yaml.safe_dump({"groups": [{"name": "g", "rules": [{"alert": "A", "expr": "sum by (model"}]}]}))
    assert subprocess.run([promtool, "check", "rules", str(broken)], capture_output=True).returncode != 0


# ---- a real Prometheus scraping a running Helios ----------------------------------------------

import json  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402

import httpx  # noqa: E402

from conftest import free_port  # noqa: E402
from telemetry.dashboards import DASHBOARDS, RATE  # noqa: E402
from telemetry.energy import open_meter  # noqa: E402
from telemetry.metrics import CONTROLLER, ENERGY, LENGTH, SERVING  # noqa: E402

# What runs in this test, and why the rest is absent. A query that reads a metric of a
# component not running here must be empty; every other query must return data.
ABSENT = {
    CONTROLLER: "this stack serves no SLO file, so no controller runs (tests/test_controller_serve.py checks "
                "its metrics through Ray's endpoint)",
    LENGTH: "the tiny test models have no length head: no request carries a predicted length",
    ENERGY: "this machine exposes neither RAPL (/sys/class/powercap) nor an NVIDIA GPU",
}
if open_meter(gpu=False) is not None:  # a machine with RAPL: the energy panels must fill
    ABSENT.pop(ENERGY)
EXPECTED_EMPTY = {
    "Active model (controller)": ABSENT.get(CONTROLLER),
    "Switches by reason (controller)": ABSENT.get(CONTROLLER),
    "Profiling runs (controller)": ABSENT.get(CONTROLLER),
    "Apply failures (controller)": ABSENT.get(CONTROLLER),
    "Predicted vs actual length": ABSENT.get(LENGTH),
    "Length prediction error": ABSENT.get(LENGTH),
    "Recomputations per second": ABSENT.get(LENGTH),
    "Energy per generated token": ABSENT.get(ENERGY),
    "Power": ABSENT.get(ENERGY),
}
EXPECTED_EMPTY = {title: reason for title, reason in EXPECTED_EMPTY.items() if reason}
SCRAPE_S = 1
# A model that loads 2 of its 4 layers (every token breaches) in 8 KV blocks (requests get preempted)
PREFIX_MODEL = {"id": "tiny-prefix", "num_cpus": 0, "engine": {"max_layers": 2, "kv_cache_memory": "64KiB"}}


def _start_prometheus(tmp_path: Path, metrics_url: str) -> tuple[subprocess.Popen, str]:
    target = metrics_url.removeprefix("http://").removesuffix("/metrics")
    config = {"global": {"scrape_interval": f"{SCRAPE_S}s", "evaluation_interval": f"{SCRAPE_S}s"},
              "scrape_configs": [{"job_name": "ray", "static_configs": [{"targets": [target]}]}]}
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    address = f"127.0.0.1:{free_port()}"
    process = subprocess.Popen(
        [_tool("prometheus"), f"--config.file={tmp_path / 'prometheus.yml'}",
         f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address={address}", "--log.level=warn"],
        stdout=subprocess.DEVNULL, stderr=open(tmp_path / "prometheus.log", "w"))
    url = f"http://{address}"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/-/ready", timeout=1).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    process.kill()
    raise AssertionError("prometheus did not get ready: " + (tmp_path / "prometheus.log").read_text())


def _query(url: str, expr: str) -> list:
    reply = httpx.get(f"{url}/api/v1/query", params={"query": expr}, timeout=5).json()
    assert reply["status"] == "success", (expr, reply)
    return [r for r in reply["data"]["result"] if r["value"][1] not in ("NaN", "+Inf", "-Inf")]


def _as_prometheus_sees_it(expr: str) -> str:
    """Grafana's variables as Grafana would fill them: every model, a rate window of 30 scrapes."""
    return expr.replace("$model", ".*").replace(RATE, f"{30 * SCRAPE_S}s")


def _deploy_prefix_model(served) -> str:
    from ray import serve

    from deployments.app import build_app_from_config
    from deployments.config import parse_config

    model = {**PREFIX_MODEL, "source": str(served["folders"]["tiny"])}
    config = parse_config({"models": [model]})
    serve.run(build_app_from_config(config), name="helios-prometheus-test", route_prefix="/prom", blocking=False)
    return served["base_url"] + "/prom/v1/completions"


def _traffic(served, prefix_url: str, prefix_requests: int, tiny_requests: int) -> None:
    """Bounded, concurrent requests to the prefix model (preemptions, breaches) and to `tiny`."""
    def post(url, model):
        body = {"model": model, "prompt": "Hello there my friend", "max_tokens": 40, "temperature": 0,
                "ignore_eos": True}
        reply = httpx.post(url, json=body, timeout=60)
        assert reply.status_code == 200, reply.text

    jobs = [(prefix_url, "tiny-prefix")] * prefix_requests + [(served["base_url"] + "/v1/completions", "tiny")] * tiny_requests
    with ThreadPoolExecutor(len(jobs)) as pool:
        list(pool.map(lambda job: post(*job), jobs))


def test_every_dashboard_panel_returns_data_from_prometheus(served, tmp_path):
    _tool("prometheus")
    started = time.monotonic()
    prefix_url = _deploy_prefix_model(served)
    process, url = _start_prometheus(tmp_path, served["metrics_url"])
    try:
        # Ray exports a histogram from its first observation on, and a rate needs an increase
        # between two scrapes: a first wave creates the series, the second moves them
        _traffic(served, prefix_url, 1, 1)
        time.sleep(3 * SCRAPE_S + 1)  # Ray's report interval (0.5 s in the fixture) + scrapes
        _traffic(served, prefix_url, 6, 4)
        panels = [panel for dashboard in DASHBOARDS for panel in dashboard.panels()]
        for panel in panels:  # the expected-empty list is exactly the panels of absent components
            assert (panel.title in EXPECTED_EMPTY) == bool(panel.sources() & set(ABSENT)), panel.title
        targets = [(panel.title, target.expr) for panel in panels for target in panel.targets]
        empty = {(title, expr) for title, expr in targets if _target_sources(expr) & set(ABSENT)}
        pending = set(targets) - empty
        deadline = time.monotonic() + 45
        next_wave = time.monotonic() + 5
        while pending and time.monotonic() < deadline:
            pending = {(title, expr) for title, expr in pending if not _query(url, _as_prometheus_sees_it(expr))}
            if pending and time.monotonic() > next_wave:
                # Ray's exporter may first show a series after both waves were counted (CI saw this
                # once): a rate then never moves, so keep a trickle of traffic while any panel waits
                _traffic(served, prefix_url, 1, 1)
                next_wave = time.monotonic() + 5
            time.sleep(SCRAPE_S)
        assert not pending, "panels without data:\n" + "\n".join(f"{t}: {e}" for t, e in sorted(pending))
        for title, expr in empty:
            assert not _query(url, _as_prometheus_sees_it(expr)), \
                f"{title} has data now: take it off EXPECTED_EMPTY ({EXPECTED_EMPTY[title]})"
        _check_alert_inputs(url)
        _check_exit_heatmap(url)
    finally:
        process.terminate()
        process.wait(timeout=10)
        from ray import serve

        serve.delete("helios-prometheus-test")
    elapsed = time.monotonic() - started
    assert elapsed < 90, f"took {elapsed:.0f} s"


def _target_sources(expr: str) -> set[str]:
    return {BY_NAME[name].source for name in referenced_metrics(expr)}


def _check_alert_inputs(url: str) -> None:
    """Every series an alert reads exists under the name the rules use, and no alert fires."""
    names = {alerts.SERVE_REPLICA_HEALTHY}
    for group in alerts.rule_groups():
        for rule in group["rules"]:
            names |= {BY_NAME[n].series + ("_bucket" if BY_NAME[n].buckets else "")
                      for n in referenced_metrics(rule["expr"])}
    for name in sorted(names):
        assert _query(url, f"count({{__name__={json.dumps(name)}}})"), f"{name} is not in Prometheus"
    healthy = _query(url, f'{alerts.SERVE_REPLICA_HEALTHY}{{{alerts.HELIOS_DEPLOYMENTS}}}')
    assert {r["metric"]["deployment"] for r in healthy} >= {"LLMServer:tiny", "LLMServer:tiny-prefix"}
    down = alerts.rule_groups()[1]["rules"][0]
    assert down["alert"] == "HeliosReplicaDown" and not _query(url, down["expr"])


def _check_exit_heatmap(url: str) -> None:
    """The prefix model's tokens all left at layer 2, each of them breached, and some were preempted
    (counters move with Ray's report interval: the last wave may land a scrape or two later)."""
    def totals() -> tuple[set, float, float]:
        by_layer = _query(url, 'sum by (exit_layer) (ray_helios_tokens_per_exit_layer_total{model="tiny-prefix"})')
        breaches = _query(url, 'sum(ray_helios_confidence_breaches_total{model="tiny-prefix"})')
        generated = _query(url, 'sum(ray_helios_generation_tokens_total{model="tiny-prefix"})')
        return ({r["metric"]["exit_layer"] for r in by_layer}, float(breaches[0]["value"][1]),
                float(generated[0]["value"][1]))

    deadline = time.monotonic() + 10
    while True:
        layers, breaches, generated = totals()
        if (breaches == generated >= 7 * 40) or time.monotonic() > deadline:
            break
        time.sleep(SCRAPE_S)
    assert layers == {"2"} and breaches == generated >= 7 * 40, (layers, breaches, generated)
    assert _query(url, 'sum(ray_helios_num_preemptions_total{model="tiny-prefix"}) > 0')
