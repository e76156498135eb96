"""The applier (controller/applier.py) retries a failed redeploy with backoff, a newer decision
replacing the retry; the controller counts each failure (no Ray: plain threads, short backoffs)."""

import logging
import time
from collections import defaultdict

from controller.applier import Applier
from controller.slo import ApplyRetry, parse_slo

QUICK = ApplyRetry(attempts=4, first_delay_s=0.01, max_delay_s=0.02)


class Flaky:
    """A deploy that raises for its first `failures` calls (all of them: None), recording every call."""

    def __init__(self, failures: int | None):
        self.failures, self.calls, self.applied, self.failed = failures, [], [], []

    def __call__(self, candidate: str, depth: int) -> None:
        self.calls.append((candidate, depth))
        if self.failures is None or len(self.calls) <= self.failures:
            raise RuntimeError(f"replica failed to load (call {len(self.calls)})")

    def applier(self, retry: ApplyRetry, applied=None) -> Applier:
        return Applier(self, lambda target, s: self.applied.append(target), applied, retry, self.failed.append)


def test_backoff_doubles_up_to_its_cap():
    retry = ApplyRetry(attempts=6, first_delay_s=5, max_delay_s=30)
    assert [retry.delay(n) for n in range(1, 6)] == [5, 10, 20, 30, 30]
    assert parse_slo({"model": "m", "memory_budget": 1, "candidates": [{"id": "a", "depths": [1]}]}).apply_retry \
        == ApplyRetry(attempts=5, first_delay_s=5.0, max_delay_s=60.0)


def test_a_deploy_that_fails_twice_is_applied_at_the_third_attempt(caplog):
    caplog.set_level(logging.INFO, "helios.controller")
    deploy = Flaky(failures=2)
    applier = deploy.applier(QUICK, applied=("a", 4))
    applier.submit(("a", 8))
    assert applier.wait_idle(10)  # waits through the backoffs
    assert deploy.calls == [("a", 8)] * 3 and deploy.failed == [("a", 8)] * 2 and deploy.applied == [("a", 8)]
    assert applier.state() == {"applied": "a@8", "applying": None, "pending": None, "apply_error": None,
                               "apply_failures": 0, "retry_in_s": None}
    assert [r.getMessage() for r in caplog.records] == [
        "applying a@8 failed (attempt 1 of 4): retrying in 0.01 s",
        "applying a@8 failed (attempt 2 of 4): retrying in 0.02 s", "applied a@8 at attempt 3"]


def test_a_deploy_that_always_fails_stops_after_its_attempts(caplog):
    deploy = Flaky(failures=None)
    applier = deploy.applier(QUICK, applied=("a", 4))
    applier.submit(("a", 8))
    assert applier.wait_idle(10)
    time.sleep(0.1)  # ten backoffs' worth: no further attempt comes
    assert deploy.calls == [("a", 8)] * 4 and len(deploy.failed) == 4 and deploy.applied == []
    state = applier.state()
    assert state["applied"] == "a@4" and state["pending"] is None and state["apply_failures"] == 4  # the old one serves
    assert state["apply_error"].startswith("a@8: RuntimeError('replica failed to load (call 4)')")
    assert caplog.records[-1].getMessage() == "applying a@8 failed (attempt 4 of 4): giving up until the next decision"
    assert len(caplog.records) == 4 and caplog.records[-1].exc_info is not None  # each one, with its traceback


def test_a_newer_decision_during_the_backoff_wins():
    deploy = Flaky(failures=1)
    applier = deploy.applier(ApplyRetry(attempts=3, first_delay_s=60))  # a retry that would wait a minute
    applier.submit(("a", 8))
    deadline = time.monotonic() + 10
    while applier.state()["retry_in_s"] is None and time.monotonic() < deadline:
        time.sleep(0.01)
    state = applier.state()  # answered during the backoff, as is submit below
    assert state["pending"] == "a@8" and 50 < state["retry_in_s"] <= 60 and state["apply_failures"] == 1
    assert not applier.wait_idle(0.05)  # a waiting retry is pending: not idle
    started = time.monotonic()
    applier.submit(("b", 4))
    assert applier.wait_idle(10) and time.monotonic() - started < 5
    assert deploy.calls == [("a", 8), ("b", 4)] and deploy.applied == [("b", 4)]  # a@8 never tried again
    assert applier.state()["apply_error"] is None and applier.state()["apply_failures"] == 0


def test_a_decision_back_to_what_runs_cancels_the_retry():
    deploy = Flaky(failures=None)
    applier = deploy.applier(ApplyRetry(attempts=3, first_delay_s=60), applied=("a", 4))
    applier.submit(("a", 8))
    deadline = time.monotonic() + 10
    while applier.state()["retry_in_s"] is None and time.monotonic() < deadline:
        time.sleep(0.01)
    applier.submit(("a", 4))
    assert applier.wait_idle(1) and deploy.calls == [("a", 8)] and applier.state()["applied"] == "a@4"


def test_the_controller_counts_each_failed_attempt(tmp_path, monkeypatch):
    from controller import actor
    from deployments import metrics as ray_metrics
    from test_controller_actor import REPO
    from test_telemetry import _Recorder

    monkeypatch.setattr(ray_metrics, "_RAY_KIND", defaultdict(lambda: _Recorder))
    monkeypatch.setattr(actor.ray, "is_initialized", lambda: True)  # the metrics of a controller in Ray
    slo = parse_slo({"model": "m", "memory_budget": "600MiB", "constraints": {"min_agreement": 0.0},
                     "history": str(tmp_path / "history.jsonl"), "candidates": [{"id": "small", "depths": [4, 8]}],
                     "apply_retry": {"attempts": 2, "first_delay_s": 0.01}})
    calls = []

    def fail(slo, repo, candidate, depth):
        calls.append((candidate, depth))
        raise RuntimeError("Serve refused the config")

    controller = actor.Controller(slo, REPO, fail)
    assert controller.applier.wait_idle(10) and calls == [("small", 4)] * 2
    failures = controller.metrics.apply_failures.values
    assert failures == {(("candidate", "small"), ("depth", "4"), ("model", "m")): [1, 1]}
    assert controller.current()["apply_failures"] == 2 and "Serve refused" in controller.current()["apply_error"]


def test_the_first_deployment_waits_through_retries(monkeypatch):
    """`helios serve` (controller/serve.py) fails only once no retry waits (a fake actor, no Ray)."""
    import pytest

    from controller import serve as slo_serve

    waiting = {"applied": None, "applying": None, "pending": "a@4", "apply_error": "a@4: boom",
               "apply_failures": 1, "retry_in_s": 5.0}
    states = [waiting, {**waiting, "pending": None, "apply_failures": 5, "retry_in_s": None}]
    call = lambda value=None: value  # noqa: E731
    actor = type("Actor", (), {"deploy": type("M", (), {"remote": staticmethod(call)}),
                               "current": type("M", (), {"remote": staticmethod(lambda: states.pop(0))})})
    monkeypatch.setattr(slo_serve, "start_controller", lambda *args, **kwargs: actor)
    monkeypatch.setattr(slo_serve, "_handles", [])
    monkeypatch.setattr(slo_serve.ray, "get", lambda value: value)
    monkeypatch.setattr(slo_serve.time, "sleep", lambda s: None)
    with pytest.raises(RuntimeError, match=r"could not deploy a@4: boom \(5 attempts\)"):
        slo_serve.deploy_through_controller(None, None)
    assert states == []  # the first state (a retry waiting) did not stop it
