"""The controller's metrics, recorded from its actor through the Ray metric objects that
deployments/metrics.py builds from telemetry/metrics.py's specs (one place for each).

- helios_active_model_info{model, candidate, depth} = 1 for what runs now (0 for what ran before),
  set once a change is deployed, not when it is decided;
- helios_switches_total{model, reason}: changes decided; reason `safety` (breaches over the limit
  or a broken constraint) or `gain` (a better objective, past the hysteresis);
- helios_profiling_runs_total{model}: live profiling runs (live profiling calls `profiled`).
- helios_controller_apply_failures_total{model, candidate, depth}: failed deploy attempts (each
  retry of controller/applier.py counts), recorded as they fail.
"""

from __future__ import annotations

from deployments.metrics import ray_metric
from telemetry.metrics import spec


def switch_reason(reason: str) -> str:
    """A decision's reason text -> the metric's label (`safety: ...` / `gain: ...`)."""
    head = reason.split(":", 1)[0]
    return head if head in ("safety", "gain") else "other"


class ControllerMetrics:
    def __init__(self, model: str):
        tags = {"model": model}
        self.active = ray_metric(spec("helios_active_model_info"), tags)
        self.switches = ray_metric(spec("helios_switches_total"), tags)
        self.profiling_runs = ray_metric(spec("helios_profiling_runs_total"), tags)
        self.apply_failures = ray_metric(spec("helios_controller_apply_failures_total"), tags)
        self._serving: tuple[str, int] | None = None
        self._previous: tuple[str, int] | None = None

    def serving(self, candidate: str, depth: int) -> None:
        """What runs now; called again now and then (an exporter may drop a gauge set only once)."""
        if self._serving not in (None, (candidate, depth)):
            self._previous = self._serving
        self._serving = (candidate, depth)
        if self._previous is not None:
            self.active.set(0, tags={"candidate": self._previous[0], "depth": str(self._previous[1])})
        self.active.set(1, tags={"candidate": candidate, "depth": str(depth)})

    def refresh(self) -> None:
        if self._serving is not None:
            self.serving(*self._serving)

    def switched(self, reason: str) -> None:
        self.switches.inc(1, tags={"reason": switch_reason(reason)})

    def apply_failed(self, candidate: str, depth: int) -> None:
        self.apply_failures.inc(1, tags={"candidate": candidate, "depth": str(depth)})

    def profiled(self, runs: int = 1) -> None:
        if runs > 0:
            self.profiling_runs.inc(runs)
