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
