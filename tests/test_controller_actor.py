"""The controller loop: decisions recorded and applied, resumed from its history after a restart
(in-process, then as a Ray actor killed and restarted by Ray)."""

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
    def __init__(self):
        self.calls = []

    def __call__(self, slo, repo, candidate_id, depth):
        self.calls.append((candidate_id, depth))


def test_decisions_are_applied_recorded_and_resumed(tmp_path):
    slo, applied = make_slo(tmp_path), Recorder()
    loop = Controller(slo, REPO, applied)
    assert applied.calls == [("small", 4)]  # the start decision deploys
    assert loop.observe(steps(2, breaches=2)) is None  # 4 of 20 tokens: under the limit, interval not over
    decision = loop.observe(steps(6, breaches=10))  # every token breaches: over 50 in the last 100
    assert decision["action"] == "deepen" and decision["trigger"] == "breaches"
    assert applied.calls == [("small", 4), ("small", 8)]
    assert loop.observe(steps(4, breaches=0))["action"] == "stay"  # interval of 4 requests, nothing to gain yet
    records = history.read(slo.history)
    assert [r["action"] for r in records] == ["start", "deepen", "stay"]

    restarted = Controller(slo, REPO, applied)  # a new incarnation: same arguments, same file
    assert restarted.current()["candidate"] == "small" and restarted.current()["depth"] == 8
    assert restarted.state.requests == loop.state.requests and restarted.state.last_change_request == 8
    assert applied.calls == [("small", 4), ("small", 8)]  # resuming redeploys nothing


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
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
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
        assert [r["action"] for r in ray.get(get_controller().history.remote())] == ["start", "deepen"]
    finally:
        ray.shutdown()
