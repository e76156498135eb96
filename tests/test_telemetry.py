"""Metric specs (telemetry/metrics.py), the Ray recorder (deployments/metrics.py) fed with
hand-made StepStats, and the energy meters (telemetry/energy.py) on fake counters."""

from __future__ import annotations

import subprocess
import sys
import types
from collections import defaultdict

import pytest

from helios.stats import FinishedRequest, StepStats
from telemetry import energy
from telemetry.metrics import COUNTER, HISTOGRAM, METRICS, SERVING, series_names, spec


def test_specs_are_well_formed():
    names = [m.name for m in METRICS]
    assert len(names) == len(set(names))
    for metric in METRICS:
        assert metric.name.startswith("helios_") and metric.labels[0] == "model", metric
        assert metric.name.endswith("_total") == (metric.kind == COUNTER), metric
        assert (metric.kind == HISTOGRAM) == bool(metric.buckets), metric
        assert list(metric.buckets) == sorted(set(metric.buckets)) and all(b > 0 for b in metric.buckets), metric
    assert "ray_helios_time_to_first_token_seconds_bucket" in series_names()
    assert "ray_helios_num_requests_running" in series_names()


def test_telemetry_imports_no_ray():
    code = ("import sys, telemetry.metrics, telemetry.energy, telemetry.dashboards, telemetry.alerts; "
            "assert not [m for m in sys.modules if m == 'ray' or m.startswith('ray.')], 'ray imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


class _Recorder:
    """Stands in for a Ray metric: keeps every call by its full tag set."""

    def __init__(self, name, description, tag_keys, boundaries=None):
        self.name, self.tag_keys, self.default = name, tag_keys, {}
        self.values = defaultdict(list)

    def set_default_tags(self, tags):
        self.default = dict(tags)

    def _key(self, tags):
        full = {**self.default, **(tags or {})}
        assert set(full) == set(self.tag_keys), (self.name, full)
        return tuple(sorted(full.items()))

    def inc(self, value=1.0, tags=None):
        assert value > 0, "Ray counters refuse inc(0)"
        self.values[self._key(tags)].append(value)

    def set(self, value, tags=None):
        self.values[self._key(tags)].append(value)

    observe = set


@pytest.fixture()
def serving_metrics(monkeypatch):
    from deployments import metrics as ray_metrics

    monkeypatch.setattr(ray_metrics, "_RAY_KIND", defaultdict(lambda: _Recorder))
    return ray_metrics.ServingMetrics("tiny", "/models/tiny", 4, 8, "token", energy_meter=None)


def _step(**fields) -> StepStats:
    base = dict(step_time_s=0.01, num_prompt_tokens=0, num_generation_tokens=0, tokens_per_exit_layer={},
                confidence_breaches=0, num_preemptions=0, num_running=0, num_waiting=0, kv_cache_usage=0.0,
                num_layers_loaded=4)
    return StepStats(**{**base, **fields})


def _finished(predicted: int | None, actual: int) -> FinishedRequest:
    return FinishedRequest("r", 5, actual, "stop", 0.0, 0.1, 1.0, predicted_length=predicted)


def _sum(metric, **tags) -> float:
    return sum(sum(v) for key, v in metric.values.items() if set(tags.items()) <= set(key))


def test_observe_step_counts_each_steps_own_work(serving_metrics):
    m = serving_metrics
    m.observe_step(_step(num_prompt_tokens=12, num_generation_tokens=3, tokens_per_exit_layer={2: 1, 4: 2},
                         confidence_breaches=2, num_running=3, num_waiting=1, kv_cache_usage=0.25))
    m.observe_step(_step(num_generation_tokens=2, tokens_per_exit_layer={4: 2}, num_preemptions=1,
                         num_running=2, kv_cache_usage=0.5, num_layers_loaded=3))
    m.observe_step(_step(num_layers_loaded=3))  # idle: nothing counted, gauges follow
    assert _sum(m.prompt_tokens) == 12 and _sum(m.generation_tokens) == 5
    assert _sum(m.exit_tokens, exit_layer="4") == 4 and _sum(m.exit_tokens, exit_layer="2") == 1
    assert _sum(m.breaches) == 2 and _sum(m.preemptions) == 1
    assert all(("model", "tiny") in key for key in m.exit_tokens.values)
    assert [v for values in m.running.values.values() for v in values] == [3, 2, 0]
    assert list(m.kv_usage.values.values())[0] == [0.25, 0.5, 0.0]
    assert list(m.layers_loaded.values.values())[0][-1] == 3  # a depth change shows
    info = list(m.model_info.values)[0]
    assert dict(info) == {"model": "tiny", "source": "/models/tiny", "num_layers": "8", "exit_policy": "token"}


def test_length_prediction_and_requests(serving_metrics):
    m = serving_metrics
    m.observe_step(_step(finished=(_finished(100, 60), _finished(10, 40), _finished(None, 7))))
    assert dict(m.predicted_length.values) == {(("model", "tiny"),): [100, 10]}
    assert _sum(m.length_error, direction="over") == 40 and _sum(m.length_error, direction="under") == 30
    assert _sum(m.recomputations) == 1  # the one that outran its prediction (10 < 40)
    m.observe_request(0.5, 2.5, 5, "length")
    assert _sum(m.ttft) == 0.5 and _sum(m.tpot) == pytest.approx(0.5) and _sum(m.e2e) == 2.5
    assert _sum(m.generation_length) == 5 and _sum(m.request_success, finished_reason="length") == 1


class _FakeMeter(energy.EnergyMeter):
    name = "rapl"

    def __init__(self):
        self.joules, self.now = 100.0, 0.0
        self.clock = lambda: self.now

    def read_joules(self):
        return self.joules


def test_energy_per_token_over_windows(monkeypatch):
    from deployments import metrics as ray_metrics

    monkeypatch.setattr(ray_metrics, "_RAY_KIND", defaultdict(lambda: _Recorder))
    meter = _FakeMeter()
    m = ray_metrics.ServingMetrics("tiny", "src", 4, 4, "none", energy_meter=meter)
    recorder = m._energy
    meter.joules, meter.now = 130.0, 2.0
    m.observe_step(_step(num_generation_tokens=10))  # window still open (5 s)
    assert _sum(recorder.joules_total, meter="rapl") == 30 and not recorder.per_token.values
    meter.joules, meter.now = 150.0, 6.0
    m.observe_step(_step(num_generation_tokens=10))
    assert _sum(recorder.joules_total) == 50
    assert list(recorder.per_token.values.values()) == [[2.5]]  # 50 J over 20 tokens


def _fake_rapl(root, name, energy_uj, max_uj=1000):
    domain = root / name
    domain.mkdir(parents=True)
    (domain / "energy_uj").write_text(f"{energy_uj}\n")
    (domain / "max_energy_range_uj").write_text(f"{max_uj}\n")
    return domain


def test_rapl_sums_packages_and_handles_wraparound(tmp_path):
    package0 = _fake_rapl(tmp_path, "intel-rapl:0", 900)
    package1 = _fake_rapl(tmp_path, "intel-rapl:1", 100)
    _fake_rapl(tmp_path, "intel-rapl:0:0", 5)  # a subdomain: part of package 0, not added
    meter = energy.open_meter(gpu=False, powercap=tmp_path)
    assert isinstance(meter, energy.RaplMeter) and [d.name for d in meter.domains] == ["intel-rapl:0",
                                                                                       "intel-rapl:1"]
    (package0 / "energy_uj").write_text("50\n")  # wrapped: 900 -> 1000 -> 0 -> 50 = 151 uJ
    (package1 / "energy_uj").write_text("300\n")
    assert meter.read_joules() == pytest.approx(351e-6)


def test_no_counter_means_no_meter(tmp_path, monkeypatch):
    assert energy.open_meter(gpu=False, powercap=tmp_path) is None
    domain = tmp_path / "intel-rapl:0"
    domain.mkdir()  # present but unreadable (root-only kernels) or empty
    assert energy.open_meter(gpu=False, powercap=tmp_path) is None
    monkeypatch.setitem(sys.modules, "pynvml", None)  # nvidia-ml-py not installed
    assert energy.open_meter(gpu=True) is None


def test_nvml_meter_reads_visible_gpus(monkeypatch):
    class NVMLError(Exception):
        pass

    fake = types.SimpleNamespace(
        NVMLError=NVMLError, nvmlInit=lambda: None, nvmlDeviceGetCount=lambda: 3,
        nvmlDeviceGetHandleByIndex=lambda i: i, nvmlDeviceGetHandleByUUID=lambda u: {"GPU-a": 0}[u],
        nvmlDeviceGetTotalEnergyConsumption=lambda h: [1500, 2500, 4000][h])
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-a,2")
    meter = energy.open_meter(gpu=True)
    assert meter.name == "nvml" and meter.read_joules() == pytest.approx(5.5)  # (1500 + 4000) mJ

    def unsupported(handle):
        raise NVMLError("not supported")

    fake.nvmlDeviceGetTotalEnergyConsumption = unsupported
    assert energy.open_meter(gpu=True) is None


def test_only_serving_metrics_are_recorded_by_a_replica(serving_metrics):
    recorded = {r.name for r in vars(serving_metrics).values() if isinstance(r, _Recorder)}
    serving = {m.name for m in METRICS if m.source == SERVING}
    assert serving <= recorded, serving - recorded
    assert spec("helios_length_prediction_error_tokens").name in recorded


# ---- dashboards (telemetry/dashboards.py) ----------------------------------------------------

REPO = __import__("pathlib").Path(__file__).parents[1]


def test_committed_dashboards_are_current():
    from telemetry.dashboards import DASHBOARDS, file_name, render

    folder = REPO / "k8s" / "dashboards"
    assert sorted(p.name for p in folder.glob("*.json")) == sorted(file_name(d) for d in DASHBOARDS)
    for dashboard in DASHBOARDS:
        assert (folder / file_name(dashboard)).read_text() == render(dashboard), \
            "stale: run python -m telemetry.dashboards --out k8s/dashboards/"


def test_every_panel_queries_defined_metrics():
    import json

    from telemetry.dashboards import DASHBOARDS, file_name, referenced_metrics
    from telemetry.metrics import BY_NAME

    for dashboard in DASHBOARDS:
        model = json.loads((REPO / "k8s" / "dashboards" / file_name(dashboard)).read_text())
        panels = [p for p in model["panels"] if p["type"] != "row"]
        assert len({p["id"] for p in model["panels"]}) == len(model["panels"])
        for panel in panels:
            assert panel["targets"], panel["title"]
            assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
            for target in panel["targets"]:
                names = referenced_metrics(target["expr"])
                assert names and names <= set(BY_NAME), (panel["title"], names - set(BY_NAME))


def test_referenced_metrics_catches_unknown_names():
    from telemetry.dashboards import referenced_metrics

    assert referenced_metrics("rate(ray_helios_time_to_first_token_seconds_bucket[1m])") == \
        {"helios_time_to_first_token_seconds"}
    assert referenced_metrics("ray_helios_prompt_tokens_total") == {"helios_prompt_tokens_total"}
    assert referenced_metrics("ray_helios_no_such_metric_bucket") == {"helios_no_such_metric_bucket"}


def test_energy_window_for_benchmarks():
    meter = _FakeMeter()
    with energy.EnergyWindow(meter) as window:
        meter.joules += 12.0
    assert window.joules == 12.0 and window.per_token(48) == 0.25
    with energy.EnergyWindow(None) as absent:
        pass
    assert absent.joules is None and absent.per_token(48) is None  # not measured: no figure at all
