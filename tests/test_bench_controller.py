"""bench/controller.py's core loop on two tiny random-weight models: a phased workload, the
controller's decisions, a depth change made while requests run, and every request accounted for."""

import sys
from pathlib import Path

import pytest

from controller.slo import parse_slo
from helios import LLMEngine
from test_controller_repository import MiB, candidate, repository

# appended, not prepended: bench/controller.py must not shadow the controller package
sys.path.append(str(Path(__file__).resolve().parent.parent / "bench"))

from controller_loop import (Adaptive, LoopResult, Record, Replica, Request, ServeLoop,  # noqa: E402
                             engine_config, summarize)

EASY, HARD = {1: 1.0}, {4: 1.0}  # synthetic exits: all at layer 1, or all wanting the full 4 layers


def tiny_slo(llama, qwen):
    return parse_slo({
        "model": "assistant", "memory_budget": "24MiB", "tokens_per_sequence": 64,
        "reassess_every": 4, "breach_window": {"tokens": 8, "limit": 4},
        "hysteresis": {"min_gain": 1.1, "stable_reassessments": 1, "min_requests_between_changes": 0},
        "constraints": {"min_agreement": 0.0},
        "candidates": [{"id": "llama", "source": str(llama), "depths": [2, 4],
                        "engine": {"exit_policy": "token", "exit_layers": [1], "exit_profile": EASY,
                                   "dtype": "float32"}},
                       {"id": "qwen", "source": str(qwen), "depths": [4], "engine": {"dtype": "float32"}}]})


TINY_REPO = repository(
    llama=candidate(num_layers=4, layer_bytes=MiB // 8, shared=MiB, kv_per_layer=256,
                    depths={2: {"throughput": {1: 20.0, 8: 100.0}, "exits": {1: 1.0}},
                            4: {"throughput": {1: 10.0, 8: 50.0}, "exits": {1: 1.0}}}),
    qwen=candidate(num_layers=4, layer_bytes=MiB // 8, shared=MiB, kv_per_layer=256,
                   depths={4: {"throughput": {1: 8.0, 8: 40.0}}}))


def workload() -> list[Request]:
    texts = ["The capital of France is", "Once upon a time", "the quick brown fox", "numbers 0123"]
    phases = [("chat", None), ("gsm8k", "so the answer is #### 4"), ("summary", None)]
    return [Request(i * len(texts) + j, phase, text, answer) for i, (phase, answer) in enumerate(phases)
            for j, text in enumerate(texts)]


@pytest.fixture(scope="module")
def tiny_pair(tiny_chat_model_dir):
    return tiny_chat_model_dir("llama"), tiny_chat_model_dir("qwen2")


def test_adaptive_run_deepens_on_a_hard_phase_and_loses_no_request(tiny_pair):
    slo = tiny_slo(*tiny_pair)
    adaptive = Adaptive(slo, TINY_REPO)
    assert adaptive.choice == ("llama", 2)  # the repository's best safe option
    # loaded up front, so the swap's background "load" ends at once and the test does not race it
    engines = {choice: LLMEngine(engine_config(slo, TINY_REPO, *choice)) for choice in [("llama", 2), ("llama", 4)]}
    load = lambda cid, depth: engines[(cid, depth)]  # noqa: E731
    requests = workload()
    loop = ServeLoop(requests, concurrency=3, max_tokens=6, load=load, adaptive=adaptive,
                     phase_profiles={"chat": EASY, "gsm8k": HARD, "summary": HARD}, progress=lambda _: None)
    result = loop.run(Replica(load("llama", 2), "llama@2"))
    report = summarize(result, requests)
    for key in ("tokens_per_s", "mean_response_s", "p95_response_s", "mean_ttft_s", "gsm8k_accuracy",
                "decisions", "swaps", "served_by", "phases"):
        assert key in report
    assert (report["requests"], report["finished"], report["failed"]) == (12, 12, 0)
    assert sum(report["served_by"].values()) == 12
    # the hard phase's breaches force a deeper load, made while requests were in flight
    changes = [d for d in report["decisions"] if d["action"] not in ("start", "stay")]
    assert changes and changes[0]["action"] == "deepen" and changes[0]["trigger"] == "breaches"
    assert [s["to"] for s in report["swaps"] if s["used"]][0] == "llama@4"
    assert report["served_by"].get("llama@4", 0) > 0 and report["served_by"]["llama@2"] > 0
    assert report["output_tokens"] > 0 and report["phases"]["gsm8k"]["requests"] == 4


def test_a_swap_hands_waiting_requests_to_the_new_engine(tiny_pair):
    """The replaced engine runs one sequence at a time: at the swap the requests it has not started
    move to the new engine (keeping their arrival time), the started one finishes where it is; every
    request is answered once, with the same greedy tokens as on an engine that served it alone."""
    from dataclasses import replace

    slo = tiny_slo(*tiny_pair)
    adaptive = Adaptive(slo, TINY_REPO)
    engines = {("llama", 2): LLMEngine(replace(engine_config(slo, TINY_REPO, "llama", 2), max_num_seqs=1)),
               ("llama", 4): LLMEngine(engine_config(slo, TINY_REPO, "llama", 4))}
    load = lambda cid, depth: engines[(cid, depth)]  # noqa: E731
    hard = [r for r in workload() if r.phase == "gsm8k"]  # every token breaches at depth 2
    requests = [Request(i, "gsm8k", r.prompt, r.answer) for i, r in enumerate(hard + hard)]
    loop = ServeLoop(requests, concurrency=4, max_tokens=6, load=load, adaptive=adaptive,
                     phase_profiles={"gsm8k": HARD}, progress=lambda _: None)
    report = summarize(loop.run(Replica(load("llama", 2), "llama@2")), requests)
    swap = next(s for s in report["swaps"] if s["used"])
    assert swap["to"] == "llama@4" and swap["handed_off"] >= 1
    assert swap["inflight_on_old"] == swap["handed_off"] + 1  # one was running: it finished on llama@2
    assert (report["requests"], report["finished"], report["failed"]) == (8, 8, 0)
    alone = Replica(LLMEngine(engine_config(slo, TINY_REPO, "llama", 4)), "alone")
    alone.set_profile(HARD)
    for record in loop.records:
        if record.served_by == "llama@4":
            seq = alone.engine.add_request(alone.as_prompt(record.request.prompt), loop.params)
            while alone.engine.has_unfinished():
                alone.engine.step()
            assert record.token_ids == seq.output_ids


def test_a_lost_or_failed_request_is_counted():
    requests = workload()[:3]
    done = Record(requests[0], "a@1", 0.0, first_token=0.1, finish=0.5, finish_reason="length", token_ids=[5, 6])
    aborted = Record(requests[1], "a@1", 0.0, finish=0.2, finish_reason="abort")
    report = summarize(LoopResult([done, aborted], wall_s=1.0, decisions=[], swaps=[]), requests)
    assert (report["finished"], report["failed"], report["failed_requests"]) == (1, 2, [1, 2])
    assert report["tokens_per_s"] == 2.0 and report["mean_response_s"] == 0.5


BENCH_CONFIGS = Path(__file__).resolve().parent.parent / "bench" / "configs"


@pytest.mark.parametrize("name", sorted(p.name for p in BENCH_CONFIGS.glob("*.yaml")))
def test_bench_slos_load_and_their_repositories_cover_them(name):
    """Each committed bench SLO parses, and its committed repository profiles every depth it allows."""
    from controller.repository import load_repository
    from controller.slo import load_slo

    slo = load_slo(BENCH_CONFIGS / name)
    profiled = load_repository(slo.repository).candidates
    for candidate in slo.candidates:
        assert sorted(profiled[candidate.id].depths) == sorted(candidate.depths), candidate.id


def test_the_memory_bound_slo_binds_as_its_comment_says():
    """controller-membound-slo.yaml: the budget holds 3 summary-sized sequences at 30 layers and
    7x as many at the 15-layer prefix (bench/results/README.md quotes these)."""
    from controller.memory import sequences_held
    from controller.repository import load_repository
    from controller.slo import load_slo

    slo = load_slo(BENCH_CONFIGS / "controller-membound-slo.yaml")
    profile = load_repository(slo.repository).candidates["smollm2-synthetic"]
    held = {depth: sequences_held(profile, depth, slo.memory_budget, slo.tokens_per_sequence) for depth in (15, 30)}
    assert held == {15: 21, 30: 3}
