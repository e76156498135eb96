"""`helios serve slo.yaml` end to end on a real local Ray Serve: two tiny candidates, the controller's
own loop (replica stats -> actor -> reassess -> switcher) deepens a prefix load and then switches
candidate under traffic; every request succeeds (streams included); the actor killed during
traffic comes back in the same state while serving goes on."""

import re
import time

import httpx
import pytest
import yaml
from conftest import free_port
from controller.repository import save_repository
from helios.cli import main
from telemetry.metrics import spec
from test_controller_repository import MiB, candidate, repository
from test_controller_switch import Clients, card, eventually, serves

# Random-weight tiny models never exit early: every token of a prefix load is forced out at its
# last layer (a confidence breach). The repository claims most tokens leave llama by layer 1 or 2
# (exits at full depth: 60% at 1, 35% at 2, 5% at 4), so llama@1 scores best and starts. Live,
# every token breaches: the window overflows, and the cheaper way out is llama@2 (llama scores 9x
# qwen). There it breaches again, llama has no deeper allowed depth, and qwen@4 (full depth: no
# breaches) is the only safe way out: a switch.
LLAMA = candidate(num_layers=4, layer_bytes=MiB // 8, shared=MiB, kv_per_layer=256,
                  depths={1: {"throughput": {1: 100.0, 8: 500.0}}, 2: {"throughput": {1: 90.0, 8: 450.0}},
                          4: {"throughput": {1: 80.0, 8: 400.0}, "exits": {1: 0.6, 2: 0.35, 4: 0.05}}})
QWEN = candidate(num_layers=4, layer_bytes=MiB // 8, shared=MiB, kv_per_layer=256,
                 depths={4: {"throughput": {1: 10.0, 8: 50.0}}})


def write_slo(folder, llama, qwen, port: int):
    save_repository(repository(llama=LLAMA, qwen=QWEN), folder / "repo.json")
    slo = {"model": "assistant", "memory_budget": "24MiB", "objective": "throughput",
           "http": {"host": "127.0.0.1", "port": port}, "ingress": {"num_cpus": 0, "niceness": 0},
           "candidates": [{"id": "llama", "source": str(llama), "depths": [1, 2], "num_cpus": 0},
                          {"id": "qwen", "source": str(qwen), "depths": [4], "num_cpus": 0}],
           # breaches alone trigger here (no interval reassessment); after the safety switch no
           # gain change may take the repository's word for llama over what was seen live
           "reassess_every": 100000, "breach_window": {"tokens": 40, "limit": 20},
           "hysteresis": {"min_requests_between_changes": 100000},
           "repository": "repo.json", "history": "history.jsonl"}
    path = folder / "slo.yaml"
    path.write_text(yaml.safe_dump(slo))
    return path


def test_a_missing_repository_names_the_profile_command(tmp_path, capsys):
    slo = write_slo(tmp_path, "/tmp/a", "/tmp/b", 8000)
    (tmp_path / "repo.json").unlink()
    assert main(["serve", str(slo)]) == 2
    assert f"helios profile {slo}" in capsys.readouterr().err


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of metric `name` (as Ray exports it) whose labels include `labels`."""
    name, total = spec(name).series, 0.0
    for line in text.splitlines():
        match = re.match(rf"^{name}\{{(.*)\}} (\S+)$", line)
        if match and all(f'{key}="{value}"' in match.group(1) for key, value in labels.items()):
            total += float(match.group(2))
    return total


def controller_pid(ray, get_controller) -> int | None:
    """The controller's process id, or None while it is restarting (a new worker imports torch
    and the engine first: on a loaded 2-core machine that took over 30 s)."""
    try:
        return ray.get(get_controller().__ray_call__.remote(lambda self: __import__("os").getpid()), timeout=10)
    except (ray.exceptions.GetTimeoutError, ray.exceptions.RayActorError):
        return None


def test_workload_breaches_deepen_then_switch_without_losing_a_request(tmp_path, tiny_chat_model_dir):
    import ray
    from ray import serve

    from controller import serve as slo_serve
    from controller.actor import get_controller

    if ray.is_initialized():  # another test's Serve holds the HTTP options; this test needs its own
        pytest.skip("Ray is already running in this process")
    port, metrics_port = free_port(), free_port()
    slo, repo = slo_serve.load(write_slo(tmp_path, tiny_chat_model_dir("llama"), tiny_chat_model_dir("qwen2"), port))
    clients = Clients(f"http://127.0.0.1:{port}")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             _metrics_export_port=metrics_port, _system_config={"metrics_report_interval_ms": 500})
    try:  # from here on Ray is shut down whatever fails, so later tests can start their own
        # what `helios serve slo.yaml` runs before it waits for Ctrl-C (the live profiler, which would
        # load candidates beside the test's, has tests of its own)
        url = slo_serve.start(slo, repo, live_profiling=False)
        assert url == f"http://127.0.0.1:{port}"
        controller = get_controller()
        assert ray.get(controller.current.remote())["applied"] == "llama@1"
        assert card(clients)["num_layers_loaded"] == 1
        clients.start()  # the workload: every token now breaches at the prefix
        started = time.monotonic()
        switched = eventually(lambda: ray.get(controller.current.remote())["applied"] == "qwen@4", 150)
        loop_s = time.monotonic() - started
        reached = [switched, eventually(lambda: card(clients)["source"] == str(slo.candidates[1].source)),
                   eventually(lambda: serves(clients, 4))]
        scrape = lambda: httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=30).text  # noqa: E731
        exported = eventually(lambda: metric(scrape(), "helios_switches_total", reason="safety") == 2 and metric(
            scrape(), "helios_active_model_info", model="assistant", candidate="qwen", depth="4") == 1, 30)

        # the controller dies during traffic: serving goes on, Ray restarts it from its history
        before, served_before = ray.get(controller.current.remote()), clients.ok
        pid = ray.get(controller.__ray_call__.remote(lambda self: __import__("os").getpid()))
        ray.kill(controller, no_restart=False)
        back = eventually(lambda: controller_pid(ray, get_controller) not in (None, pid), 180)
        after = ray.get(get_controller().current.remote())
        kept_serving = eventually(lambda: clients.ok >= served_before + 4, 60)
        records = ray.get(get_controller().history.remote())
    finally:
        clients.join()
        serve.shutdown()
        ray.shutdown()
    assert clients.failed == []  # not one request failed or was dropped, streams included
    decisions = [(r["trigger"], r["action"], f"{r['candidate']}@{r['depth']}") for r in records
                 if r["kind"] == "decision"]
    assert decisions == [("start", "start", "llama@1"), ("breaches", "deepen", "llama@2"),
                         ("breaches", "switch", "qwen@4")]
    applied = [f"{r['candidate']}@{r['depth']}" for r in records if r["kind"] == "applied"]
    assert applied == ["llama@1", "llama@2", "qwen@4"]
    assert reached == [True] * 3 and loop_s < 120
    assert exported  # two safety switches (the start is none), and what runs now
    assert back and after == before and kept_serving
    assert clients.ok >= 12
    # no serving gap: with Serve's default (stop, then start) a request waits about a whole replica
    # start-up (18.9 s of a 19.5 s switch, measured); surge first, the slowest took 1.1 s
    apply_s = [r["seconds"] for r in records if r["kind"] == "applied"][1:]  # the deepen and the switch
    assert max(clients.latencies) < 0.5 * min(apply_s)
    print(f"deepen+switch loop {loop_s:.1f} s; applies {[r.get('seconds') for r in records if r['kind'] == 'applied']}"
          f"; requests {clients.ok}; slowest {max(clients.latencies):.2f} s")


class FakeActor:
    """Stands in for the controller's handle: records what `observe.remote` was sent."""

    def __init__(self):
        self.batches = []
        self.observe = self

    def remote(self, steps, tag):
        self.batches.append((list(steps), tag))
        return object()


def step(tokens: int) -> "StepStats":
    from helios.stats import StepStats

    return StepStats(0.01, 0, tokens, {2: tokens} if tokens else {}, tokens, 0, 1, 0, 0.1, 2)


def test_the_forwarder_batches_steps_and_bounds_what_waits(monkeypatch):
    from deployments.config import ControllerLink
    from deployments.stats_forwarder import StatsForwarder

    forwarder = StatsForwarder(ControllerLink(tag="llama@2"), interval_s=3600, max_buffered=5)
    try:
        actor = None
        monkeypatch.setattr(forwarder, "_lookup", lambda: actor)
        monkeypatch.setattr(forwarder, "_busy", lambda: False)
        forwarder.observe(step(0))  # an idle step: nothing the controller counts
        for _ in range(8):
            forwarder.observe(step(3))
        forwarder.flush()  # no controller: the newest 5 wait, 3 are dropped, serving goes on
        assert (len(forwarder.pending), forwarder.dropped, forwarder.sent) == (5, 3, 0)
        actor = FakeActor()
        forwarder.observe(step(3))
        forwarder.flush()
        assert [(len(steps), tag) for steps, tag in actor.batches] == [(5, "llama@2")]  # still the newest 5
        assert forwarder.pending == [] and (forwarder.sent, forwarder.dropped) == (5, 4)
    finally:
        forwarder.close()
