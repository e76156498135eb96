"""The controller loop: decisions recorded and applied, resumed from its history after a restart
(in-process, then as a Ray actor killed and restarted by Ray)."""

import threading
import time

import pytest

from controller import history
from controller.actor import Controller, get_controller, start_controller
from controller.slo import parse_slo
from helios.stats import FinishedRequest, StepStats
from test_controller_selector import small
from test_controller_repository import repository


def make_slo(tmp_path):
    return parse_slo({"model": "m", "memory_budget": "600MiB", "constraints": {"min_agreement": 0.0},
                      "reassess_every": 4, "history": str(tmp_path / "history.jsonl"),
                      "candidates": [{"id": "small", "depths": [4, 8]}]})


REPO = repository(small=small())


def steps(n: int, breaches: int) -> list[StepStats]:
    done = (FinishedRequest("r", 5, 10, "length", 0.0, 0.1, 1.0),)
    return [StepStats(0.01, 0, 10, {4: 10}, breaches, 0, 1, 0, 0.1, 4, done) for _ in range(n)]


class Recorder:
    """An apply that records its calls; `gate` (when given) holds each call until it is set."""

    def __init__(self, gate: threading.Event | None = None):
        self.calls, self.gate, self.started = [], gate, threading.Event()

    def __call__(self, slo, repo, candidate_id, depth):
        self.started.set()
        if self.gate is not None:
            assert self.gate.wait(30)
        self.calls.append((candidate_id, depth))


def test_decisions_are_applied_recorded_and_resumed(tmp_path):
    slo, applied = make_slo(tmp_path), Recorder()
    loop = Controller(slo, REPO, applied)
    assert loop.applier.wait_idle(10) and applied.calls == [("small", 4)]  # the start decision deploys
    assert loop.observe(steps(2, breaches=2)) is None  # 4 of 20 tokens: under the limit, interval not over
    decision = loop.observe(steps(6, breaches=10))  # every token breaches: over 50 in the last 100
    assert decision["action"] == "deepen" and decision["trigger"] == "breaches"
    assert loop.applier.wait_idle(10) and applied.calls == [("small", 4), ("small", 8)]
    assert loop.current()["applied"] == "small@8"
    assert loop.observe(steps(4, breaches=0))["action"] == "stay"  # interval of 4 requests, nothing to gain yet
    records = [r for r in history.read(slo.history) if r["kind"] == "decision"]
    assert [r["action"] for r in records] == ["start", "deepen", "stay"]

    restarted = Controller(slo, REPO, applied)  # a new incarnation: same arguments, same file
    assert restarted.current()["candidate"] == "small" and restarted.current()["depth"] == 8
    assert restarted.state.requests == loop.state.requests and restarted.state.last_change_request == 8
    assert restarted.applier.wait_idle(10)
    assert applied.calls == [("small", 4), ("small", 8)]  # resuming redeploys nothing
    assert restarted.current()["applied"] == "small@8"


def test_decisions_are_applied_in_the_background_the_latest_winning(tmp_path):
    slo, gate = make_slo(tmp_path), threading.Event()
    applied = Recorder(gate)
    loop = Controller(slo, REPO, applied)  # returns while the start decision is still being applied
    assert applied.started.wait(10) and loop.current()["applying"] == "small@4"
    assert loop.observe(steps(6, breaches=10))["action"] == "deepen"  # taken during the redeploy
    assert loop.current()["pending"] == "small@8"
    kinds = [r["kind"] for r in history.read(slo.history)]
    assert kinds == ["decision", "decision"]  # recorded before it is applied
    loop.applier.submit(("small", 4))  # a later decision back to what is being applied: nothing waits
    assert loop.current()["pending"] is None
    loop.applier.submit(("small", 8))
    gate.set()
    assert loop.applier.wait_idle(10)
    assert applied.calls == [("small", 4), ("small", 8)] and loop.current()["applied"] == "small@8"


def test_steps_of_an_earlier_choice_are_ignored(tmp_path):
    loop = Controller(make_slo(tmp_path), REPO)
    assert loop.observe(steps(6, breaches=10), tag="small@8") is None  # a draining replica's steps
    assert loop.ignored_steps == 6 and loop.current()["breaches_in_window"] == 0
    assert loop.observe(steps(6, breaches=10), tag="small@4")["action"] == "deepen"


def test_a_replica_is_superseded_once_a_replica_of_the_new_choice_is_up(tmp_path):
    """Replicas of the old choice hand their unstarted requests on once a replica of the choice
    being deployed has asked too (it is up; Serve calls the deploy done only after the old ones
    drained); never before, never the new one's own replicas, and not after the deploy failed."""
    from controller.handover import Handover

    slo, gate = make_slo(tmp_path), threading.Event()
    applied = Recorder(gate)
    loop = Controller(slo, REPO, applied)
    assert applied.started.wait(10)
    gate.set()
    assert loop.applier.wait_idle(10) and loop.current()["applied"] == "small@4"
    assert not loop.superseded("small@4")
    gate.clear()
    applied.started.clear()
    assert loop.observe(steps(6, breaches=10))["action"] == "deepen"
    assert applied.started.wait(10) and loop.current()["applying"] == "small@8"
    assert not loop.superseded("small@4")  # no replica of small@8 has asked yet: small@4 keeps its requests
    assert not loop.superseded("small@8")  # the new replica is up: it asks
    assert loop.superseded("small@4")
    gate.set()
    assert loop.applier.wait_idle(10) and loop.superseded("small@4") and not loop.superseded("small@8")

    clock = iter(range(100)).__next__  # a deploy of small@8 that fails: small@4 is current again
    handover = Handover(clock)
    handover.deploying("small@8")
    assert handover.superseded("small@8", "small@8") is False and handover.superseded("small@4", "small@8")
    assert handover.superseded("small@4", "small@4") is False
    handover.deploying("small@8")  # deployed again later: its earlier replicas do not count as up
    assert not handover.superseded("small@4", "small@8")


def test_a_change_not_applied_before_a_crash_is_applied_on_resume(tmp_path):
    slo, gate = make_slo(tmp_path), threading.Event()
    first = Controller(slo, REPO, Recorder(gate))
    first.observe(steps(6, breaches=10))  # decided small@8; the start is still being applied
    again = Recorder()
    resumed = Controller(slo, REPO, again)  # as if the first had died here
    assert resumed.applier.wait_idle(10) and again.calls == [("small", 8)]
    gate.set()


def test_a_torn_last_line_is_skipped(tmp_path):
    path = tmp_path / "h.jsonl"
    history.append(path, "decision", {"candidate": "a", "depth": 3, "previous_candidate": None,
                                      "previous_depth": None, "request_count": 0})
    with path.open("a") as file:
        file.write('{"kind": "decis')
    assert len(history.read(path)) == 1 and history.resume_state(history.read(path)).depth == 3


def test_ray_restarts_the_named_actor_and_it_resumes(tmp_path):
    import ray

    if ray.is_initialized():
        pytest.skip("Ray is already running in this process")
    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        slo = make_slo(tmp_path)
        actor = start_controller(slo, REPO)
        ray.get(actor.observe.remote(steps(6, breaches=10)))
        assert ray.get(actor.current.remote())["depth"] == 8
        pid = ray.get(actor.__ray_call__.remote(lambda self: __import__("os").getpid()))
        ray.kill(actor, no_restart=False)  # as if it crashed
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                state = ray.get(get_controller().current.remote(), timeout=30)
                break
            except (ray.exceptions.RayActorError, ValueError):
                time.sleep(0.5)
        new_pid = ray.get(get_controller().__ray_call__.remote(lambda self: __import__("os").getpid()))
        assert new_pid != pid and (state["candidate"], state["depth"]) == ("small", 8)
        records = ray.get(get_controller().history.remote())
        assert [r["action"] for r in records if r["kind"] == "decision"] == ["start", "deepen"]
        assert [r["kind"] for r in records].count("applied") == 2  # the start and the deepen (no apply given)
    finally:
        ray.shutdown()


def test_switch_reasons_are_a_small_label_set():
    from controller.metrics import switch_reason

    assert switch_reason("safety: 40 breaches in the last 40 tokens; the only safe way out") == "safety"
    assert switch_reason("gain: 1.25x on throughput") == "gain"
    assert switch_reason("best of the shortlist") == "other"
