"""Live profiling: sampling bounds, the record, the quality figures (no Ray), the mirror's rules, and
one run on a real local Ray Serve where served requests are mirrored to a profiler that runs two
tiny candidates, the admin route shows the live profiles, and clients get exactly what they got
without mirroring, each request answered once."""

import asyncio
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import httpx
import pytest

from conftest import post_chat
from controller import history, live_profile
from controller.live_profile import LiveProfiler, Sample, live_record, parse_sample, profile_round, reply_lengths, \
    served_agreement, take
from controller.slo import parse_slo
from deployments import mirror
from deployments.protocol import UNTIL_CONTEXT_FULL
from test_controller_switch import TINY_REPO

CHAT = [{"role": "user", "content": "The capital of France"}]


def sample(text: str = "Paris is the capital", prompt=None, max_tokens: int = 12, greedy: bool = True) -> dict:
    return {"prompt": prompt if prompt is not None else CHAT, "max_tokens": max_tokens, "greedy": greedy,
            "stop": [], "text": text, "completion_tokens": 4, "finish_reason": "stop"}


def tiny_slo(tmp_path, profiling_prompts: int = 3, llama="/tmp/llama", qwen="/tmp/qwen"):
    return parse_slo({"model": "assistant", "memory_budget": "24MiB", "profiling_prompts": profiling_prompts,
                      "history": str(tmp_path / "history.jsonl"), "ingress": {"num_cpus": 0, "niceness": 0},
                      "candidates": [{"id": "llama", "source": str(llama), "depths": [2, 4], "num_cpus": 0},
                                     {"id": "qwen", "source": str(qwen), "depths": [4], "num_cpus": 0}]})


REPO = TINY_REPO.model_copy(update={"reference": "qwen"})  # the strongest candidate, for reference_agreement


# ---- pure parts ---------------------------------------------------------------------------------

def test_a_round_keeps_at_most_its_sample_count():
    buffer: list[Sample] = []
    assert take(buffer, [sample(f"answer {i}") for i in range(2)], limit=3) == 2
    offered = [sample(prompt=[1, 2, 3]), {"prompt": "no answer"}, sample("third"), sample("fourth")]
    assert take(buffer, offered, limit=3) == 1  # token ids and malformed samples are skipped, then the bound
    assert [s.text for s in buffer] == ["answer 0", "answer 1", "third"]
    assert take(buffer, [sample("late")], limit=3) == 0 and len(buffer) == 3


def test_replies_are_capped_and_chat_without_max_tokens_does_not_run_to_the_context():
    samples = [parse_sample(sample(max_tokens=n)) for n in (5, 200, UNTIL_CONTEXT_FULL)]
    assert reply_lengths(samples, cap=64) == [5, 64, 64]


def test_served_agreement_counts_only_greedy_answers():
    samples = [parse_sample(sample("a b c d")), parse_sample(sample("x y", greedy=False))]
    assert served_agreement(["a b z d e f", "nothing alike"], samples, cap=64) == 0.75  # 3 of the served 4 words
    assert served_agreement(["x y"], samples[1:], cap=64) is None  # a sampled answer is no reference for a replay


def test_a_served_answer_longer_than_the_cap_is_scored_as_far_as_the_replay_went():
    long = parse_sample({**sample("a b c d e f g h"), "completion_tokens": 100})
    assert served_agreement(["a b c d"], [long], cap=64) == 1.0  # a b c scored; d may be a cut word
    assert served_agreement(["a b c d"], [long], cap=200) == 0.5  # not capped: the missing words count


def test_the_record_says_what_ran_on_what():
    samples = [parse_sample(sample()) for _ in range(3)]
    record = live_record("qwen", 4, samples, {"throughput_tok_s": 12.5, "served_agreement": 0.5},
                         {"candidate": "llama", "depth": 2}, now=100.0)
    assert record == {"candidate": "qwen", "depth": 4, "prompts": 3, "time": 100.0,
                      "served": {"candidate": "llama", "depth": 2}, "throughput_tok_s": 12.5, "served_agreement": 0.5}


def test_a_round_runs_the_shortlist_reference_first_and_appends_to_the_history(tmp_path, monkeypatch):
    slo, ran = tiny_slo(tmp_path), []
    replies = {"qwen": ["Paris is the capital"], "llama": ["Paris was a capital"]}

    def fake_run(candidate, depth, samples, cap, kv):
        ran.append((candidate.id, depth))
        if candidate.id == "missing":
            raise ValueError("no chat template")
        return {"throughput_tok_s": 10.0, "exit_distribution": {depth: 1.0}, "breach_share": 0.0}, replies[candidate.id]

    monkeypatch.setattr(live_profile, "run_candidate", fake_run)
    records = profile_round(slo, REPO, [parse_sample(sample())], served={"candidate": "llama", "depth": 4},
                            clock=lambda: 7.0)
    assert ran[0][0] == "qwen" and sorted(ran) == [("llama", 4), ("qwen", 4)]  # llama@2 would breach too often
    by_id = {r["candidate"]: r for r in records}
    assert by_id["qwen"]["reference_agreement"] == 1.0 and by_id["qwen"]["served_agreement"] == 1.0
    assert by_id["llama"]["reference_agreement"] == 0.5 and by_id["llama"]["reference"] == "qwen"
    assert [r["kind"] for r in history.read(slo.history)] == ["live_profile"] * 2
    assert history.read(slo.history)[1]["served"] == {"candidate": "llama", "depth": 4}
    no_reference = profile_round(slo, TINY_REPO, [parse_sample(sample())])  # the strongest is not known
    assert all(r["reference_agreement"] is None for r in no_reference)


def test_the_profiler_asks_for_samples_only_between_rounds(tmp_path, monkeypatch):
    release, rounds = threading.Event(), []

    def fake_round(slo, repository, samples, served, cap, kv):
        rounds.append([s.text for s in samples])
        release.wait(10)

    monkeypatch.setattr(live_profile, "profile_round", fake_round)
    monkeypatch.setattr(live_profile.os, "nice", lambda increment: 0)  # keep the test's own threads' priority
    profiler = LiveProfiler(tiny_slo(tmp_path, profiling_prompts=2), REPO, min_interval_s=3600, served=None)
    assert profiler.wants()
    assert profiler.offer([sample("one")]) == 1 and profiler.wants()
    assert profiler.offer([sample("two"), sample("three")]) == 1  # the round is full: it starts
    assert not profiler.wants() and profiler.offer([sample("four")]) == 0  # none taken while it runs
    release.set()
    profiler.worker.join(10)
    assert rounds == [["one", "two"]] and profiler.status()["rounds"] == 1
    assert not profiler.wants()  # and none until min_interval_s has passed


# ---- the mirror's rules, in-process -------------------------------------------------------------

def choice(text: str, finish_reason: str | None = "stop"):
    return SimpleNamespace(text=text, completion_tokens=3, finish_reason=finish_reason)


def params(max_tokens: int = 8, temperature: float = 0.0):
    from helios.sampling_params import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=temperature)


def test_only_finished_text_or_chat_choices_are_mirrored():
    jobs = [("Hello", params()), ([1, 2, 3], params()), (CHAT, params(temperature=1.0)), ("cut", params())]
    states = [choice("a"), choice("b"), choice("c"), choice("d", finish_reason=None)]
    found = mirror.samples(jobs, states)
    assert [(s["prompt"], s["text"], s["greedy"]) for s in found] == [("Hello", "a", True), (CHAT, "c", False)]
    assert all(parse_sample(s) is not None for s in found)  # what the ingress sends, the profiler takes


class FakeProfiler:
    def __init__(self, wants: bool, fail: bool = False):
        self.received, self.wanted, self.fail = [], wants, fail
        self.wants = SimpleNamespace(remote=self._wants)
        self.offer = SimpleNamespace(remote=self._offer)

    async def _wants(self):
        return self.wanted

    def _offer(self, samples):
        if self.fail:
            raise RuntimeError("actor gone")
        self.received += samples


def test_the_mirror_sends_only_while_the_profiler_asks_and_never_raises(monkeypatch):
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    jobs, states = [("Hello", params())], [choice("hi")]

    async def scenario(profiler: FakeProfiler) -> int:
        hook = mirror.Mirror(refresh_s=0)
        hook._actor = profiler
        hook.offer(jobs, states)  # the flag is not known yet: nothing sent, a refresh started
        await asyncio.sleep(0.01)
        hook.offer(jobs, states)
        return hook.offered

    wanting = FakeProfiler(wants=True)
    assert asyncio.run(scenario(wanting)) == 1 and wanting.received[0]["text"] == "hi"
    assert asyncio.run(scenario(FakeProfiler(wants=False))) == 0
    assert asyncio.run(scenario(FakeProfiler(wants=True, fail=True))) == 0  # a failing actor fails no request


def test_without_ray_or_a_profiler_the_mirror_does_nothing():
    async def scenario() -> int:
        hook = mirror.Mirror(refresh_s=0)
        for _ in range(3):
            hook.offer([("Hello", params())], [choice("hi")])
            await asyncio.sleep(0.01)
        return hook.offered

    assert asyncio.run(scenario()) == 0


def test_actor_names_agree_and_admin_routes_stay_out_of_the_schema():
    from controller.actor import ACTOR_NAME, NAMESPACE
    from deployments.ingress import app

    assert (ACTOR_NAME, NAMESPACE) == (mirror.CONTROLLER_ACTOR, mirror.NAMESPACE)
    assert live_profile.PROFILER_ACTOR == mirror.PROFILER_ACTOR
    assert not [path for path in app.openapi()["paths"] if "admin" in path or "controller" in path]


# ---- on a real local Ray Serve ------------------------------------------------------------------

ADMIN_KEY = "admin-live-0123456789"
PROMPTS = ["The capital of France", "Once upon a time", "numbers 0123", "the quick brown fox"]


def ask(base_url: str, index: int) -> str:
    """One request at temperature 0, streamed for odd indices; the reply's text."""
    stream = index % 2 == 1
    body = {"model": "assistant", "max_tokens": 8, "temperature": 0, "stream": stream,
            "messages": [{"role": "user", "content": PROMPTS[index % len(PROMPTS)]}]}
    chunks = post_chat(base_url, body)
    if not stream:
        return chunks[0]["choices"][0]["message"]["content"]
    return "".join(chunk["choices"][0]["delta"].get("content") or "" for chunk in chunks)


def engine_requests(metrics_url: str) -> float:
    """Requests the served model's engines finished, from Ray's Prometheus endpoint."""
    text = httpx.get(metrics_url, timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("ray_helios_request_success_total{") and 'model="assistant"' in line)


def settled(read, expected: float, timeout_s: float = 30) -> float:
    """`read()` once it reaches `expected` (metrics arrive with a delay), then once more a moment later."""
    deadline = time.monotonic() + timeout_s
    while read() < expected and time.monotonic() < deadline:
        time.sleep(0.3)
    time.sleep(1.5)  # metrics report every 0.5 s: an extra request would show by now
    return read()


def deploy(slo, candidate_id: str, depth: int, app_name: str, prefix: str) -> None:
    """The public model served by `candidate_id` at `depth`, the controller's routes on at /admin."""
    from ray import serve

    from deployments.app import server_name
    from deployments.config import parse_config
    from deployments.ingress import OpenAIIngress
    from deployments.llm_server import LLMServer

    source = slo.candidate(candidate_id).source
    config = parse_config({"models": [{"id": "assistant", "source": source, "num_cpus": 0,
                                       "engine": {"kv_cache_memory": "16MiB", "max_layers": depth}}],
                           "auth": {"controller_routes": "/admin"}})
    servers = {"assistant": LLMServer.options(name=server_name("assistant"), ray_actor_options={"num_cpus": 0})
               .bind(config.models[0])}
    ingress = OpenAIIngress.options(ray_actor_options={"num_cpus": 0, "runtime_env": {
        "env_vars": {"HELIOS_ADMIN_KEY": ADMIN_KEY}}}).bind(servers, config)
    serve.run(ingress, name=app_name, route_prefix=prefix)


@pytest.fixture
def ray_serve():
    """(HTTP base URL, metrics URL) of a Ray Serve of this test's own on 127.0.0.1, shut down after;
    None when this process already runs a Ray (the suite's `served`)."""
    import ray
    from ray import serve

    from conftest import free_port

    if ray.is_initialized():
        yield None
        return
    port, metrics_port = free_port(), free_port()
    # address="local": a Ray of its own even while another is running on this machine
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             _metrics_export_port=metrics_port, _system_config={"metrics_report_interval_ms": 500})
    try:  # Ray is shut down whatever fails
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield f"http://127.0.0.1:{port}", f"http://127.0.0.1:{metrics_port}/metrics"
    finally:
        serve.shutdown()
        ray.shutdown()


def test_mirrored_requests_are_profiled_on_the_shortlist_and_shown_to_the_admin(tmp_path, tiny_chat_model_dir,
                                                                               ray_serve):
    import ray
    from ray import serve

    from controller.actor import start_controller
    from controller.live_profile import start_profiler
    from controller.selector import initial_choice

    if ray_serve is None:  # this process's Ray is another test's: run in a child process with a Ray of its own
        name = "test_mirrored_requests_are_profiled_on_the_shortlist_and_shown_to_the_admin"
        child = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"{__file__}::{name}"],
                               capture_output=True, text=True, timeout=600)
        assert child.returncode == 0, child.stdout[-4000:] + child.stderr[-2000:]
        return
    slo = tiny_slo(tmp_path, llama=tiny_chat_model_dir("llama"), qwen=tiny_chat_model_dir("qwen2"))
    base_url, metrics_url = ray_serve[0] + "/live-test", ray_serve[1]
    controller = profiler = None
    try:  # what this test starts is stopped whatever fails
        first = initial_choice(slo, REPO)
        # no apply: this test deploys the choice itself; the handle is kept (a named actor whose
        # handles are all gone is collected)
        controller = start_controller(slo, REPO)
        deploy(slo, first.candidate, first.depth, "helios-live-test", "/live-test")
        baseline = [ask(base_url, i) for i in range(len(PROMPTS))]  # no profiler yet: nothing mirrored

        profiler = start_profiler(slo, REPO, max_tokens=8, min_interval_s=3600)
        mirrored, deadline = [], time.monotonic() + 120  # a round takes seconds; more on a loaded machine
        while ray.get(profiler.status.remote())["rounds"] < 1 and time.monotonic() < deadline:
            index = len(mirrored)
            mirrored.append((ask(base_url, index), baseline[index % len(PROMPTS)]))
            if ray.get(profiler.status.remote())["busy"]:  # enough samples: wait for the round itself
                time.sleep(0.5)
        status = ray.get(profiler.status.remote())
        answered = len(baseline) + len(mirrored)
        counted = settled(lambda: engine_requests(metrics_url), answered)

        key = {"Authorization": f"Bearer {ADMIN_KEY}"}
        admin, newest = [httpx.get(base_url + "/admin/controller", params={"limit": limit}, timeout=30, headers=key)
                         for limit in (100, 2)]
        refused = [httpx.get(base_url + path, timeout=30, headers=headers).status_code for path, headers in [
            ("/admin/controller", {}), ("/admin/controller", {"Authorization": "Bearer wrong"}),
            ("/ops/controller", {"Authorization": f"Bearer {ADMIN_KEY}"}),  # not the configured prefix
            ("/admin/engine", {"Authorization": f"Bearer {ADMIN_KEY}"})]]  # admin_routes is off
    finally:
        serve.delete("helios-live-test")
        for actor in (controller, profiler):
            if actor is not None:
                ray.kill(actor, no_restart=True)

    assert status["rounds"] == 1, (status, len(mirrored))
    assert len(mirrored) >= slo.profiling_prompts
    assert all(got == expected for got, expected in mirrored)  # mirroring changed no reply (temperature 0)
    assert counted == answered, (counted, answered)  # each reached the served engine once: the profiler ran its own
    assert refused == [401, 401, 404, 404]
    assert admin.status_code == 200 and newest.status_code == 200, (admin.text, newest.text)
    view = admin.json()
    assert (view["state"]["candidate"], view["state"]["depth"]) == (first.candidate, first.depth)
    assert view["history"][0]["kind"] == "decision" and view["history"][0]["action"] == "start"
    assert newest.json()["history"] == view["history"][-2:]  # newest last; ?limit= keeps the newest
    profiles = {r["candidate"]: r for r in view["history"] if r["kind"] == "live_profile"}
    assert [r["kind"] for r in view["history"][-2:]] == ["live_profile"] * 2
    assert sorted(profiles) == ["llama", "qwen"]
    for record in profiles.values():
        assert "error" not in record, record
        assert record["prompts"] == slo.profiling_prompts
        assert record["served"] == {"candidate": first.candidate, "depth": first.depth}  # who answered the samples
        assert record["throughput_tok_s"] > 0 and record["ttft_s"] > 0 and record["tpot_p95_s"] >= 0
        assert abs(sum(record["exit_distribution"].values()) - 1) < 1e-6 and 0 <= record["breach_share"] <= 1
        assert 0 <= record["served_agreement"] <= 1 and record["reference"] == "qwen"
    # the candidate that is served replays its own greedy answers (same model and depth; batched rather
    # than one at a time, so a near tie between two tokens may still go the other way)
    assert profiles[first.candidate]["served_agreement"] >= 0.9, profiles
    assert profiles["qwen"]["reference_agreement"] == 1.0
