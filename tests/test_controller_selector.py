"""The pure selector on constructed repositories and recorded telemetry (no Ray, no engine)."""

import json
from collections import Counter

import pytest

from controller.memory import blocks_held, sequences_held
from controller.observe import BreachWindow, IntervalStats
from controller.reassess import ControllerState, reassess, start
from controller.selector import choose_depth, evaluate, expected_breach_share, initial_choice, shortlist
from controller.slo import parse_slo
from helios.stats import FinishedRequest, StepStats
from test_controller_repository import MiB, candidate, repository

FULL_EXITS = {4: 0.6, 6: 0.2, 8: 0.2}  # "small": where its tokens leave at full depth


def small(**depth_overrides):
    depths = {4: dict(throughput={1: 30.0, 8: 200.0, 32: 500.0}, latency_s=0.8, agreement=0.85,
                      reference_agreement=0.5, exits={4: 1.0}, energy_j_per_token=0.4),
              6: dict(throughput={1: 25.0, 8: 170.0, 32: 420.0}, latency_s=0.9, agreement=0.95,
                      reference_agreement=0.55, exits={4: 0.6, 6: 0.4}, energy_j_per_token=0.5),
              8: dict(throughput={1: 20.0, 8: 150.0, 32: 380.0}, latency_s=1.0, agreement=1.0,
                      reference_agreement=0.6, exits=FULL_EXITS, energy_j_per_token=0.6)}
    for depth, overrides in depth_overrides.items():
        depths[depth].update(overrides)
    return candidate(num_layers=8, depths=depths)


def mid():
    return candidate(num_layers=8, depths={8: dict(throughput={1: 40.0, 8: 120.0, 32: 300.0}, latency_s=0.5,
                                                   reference_agreement=0.6, energy_j_per_token=0.3)})


def big():
    return candidate(num_layers=12, layer_bytes=40 * MiB, shared=80 * MiB,
                     depths={12: dict(throughput={1: 10.0, 8: 60.0, 32: 150.0}, latency_s=2.0,
                                      reference_agreement=1.0, energy_j_per_token=1.0)})


def bad():  # fastest at everything, but far from the reference
    return candidate(num_layers=4, depths={4: dict(throughput={1: 99.0, 8: 900.0, 32: 2000.0}, latency_s=0.1,
                                                   reference_agreement=0.2, energy_j_per_token=0.01)})


def slo(**overrides):
    data = {"model": "assistant", "memory_budget": "600MiB", "objective": "throughput",
            "constraints": {"min_quality": 0.4, "min_agreement": 0.9},
            "candidates": [{"id": "small", "depths": [4, 6, 8]}, {"id": "mid", "depths": [8]},
                           {"id": "big", "depths": [12]}, {"id": "bad", "depths": [4]}]}
    for key, value in overrides.items():
        data[key] = {**data[key], **value} if isinstance(value, dict) and key in data else value
    return parse_slo(data)


REPO = repository(small=small(), mid=mid(), big=big(), bad=bad())


def test_memory_arithmetic_fewer_layers_hold_more_sequences():
    profile = REPO.candidates["small"]
    # 600 MiB - (20 MiB shared + 4 x 10 MiB) = 540 MiB of K/V at 4 x 1024 bytes per token
    assert blocks_held(profile, 4, 600 * MiB) == (540 * MiB) // (16 * 4 * 1024) == 8640
    assert sequences_held(profile, 4, 600 * MiB, tokens_per_sequence=512) == 8640 // 32
    assert sequences_held(profile, 8, 600 * MiB, tokens_per_sequence=512) == (500 * MiB) // (16 * 8192) // 32
    assert sequences_held(profile, 4, 600 * MiB, 500) == sequences_held(profile, 4, 600 * MiB, 512)  # whole blocks
    assert sequences_held(profile, 8, 50 * MiB, 512) == 0  # the weights alone overflow the budget


@pytest.mark.parametrize("objective, expected", [
    ("throughput", ("small", 6)),  # 420 tok/s at batch 32 beats mid's 300; small@4 breaks min_agreement
    ("latency", ("mid", 8)),  # 0.5 s beats small@6's 0.9 s
    ("energy", ("mid", 8)),  # 0.3 J/token
    ("memory", ("small", 6)),  # the smallest safe prefix holds the most sequences
])
def test_selection_per_objective_never_breaks_the_quality_floor(objective, expected):
    config = slo(objective=objective)
    choice = initial_choice(config, REPO)
    assert (choice.candidate, choice.depth) == expected
    listed = shortlist(config, REPO)
    assert "bad" not in [e.candidate for e in listed]  # reference agreement 0.2 < 0.4, whatever its speed
    assert len(listed) == 3 and all(e.feasible for e in listed)
    assert evaluate(config, REPO, "bad", 4).violations == ("reference_agreement 0.200 < 0.4",)


def test_quality_floor_left_only_the_strong_candidate_then_none():
    assert (initial_choice(slo(constraints={"min_quality": 0.9}), REPO).candidate) == "big"
    assert [e.candidate for e in shortlist(slo(shortlist_size=1), REPO)] == ["small"]
    decision, state = start(slo(constraints={"p95_tpot_s": 0.001}), REPO)  # nothing is that fast
    assert decision.reason.startswith("no option meets the constraints: p95 TPOT")
    assert state.candidate == "big"  # the fallback keeps the highest quality


def test_greedy_prefix_is_the_smallest_depth_under_the_breach_limit():
    loose = slo(constraints={"min_agreement": 0.8})
    assert choose_depth(loose, REPO, "small").depth == 4  # 40% of tokens want more than 4 layers: 40 <= 50
    assert choose_depth(slo(constraints={"min_agreement": 0.8}, breach_window={"limit": 30}), REPO, "small").depth == 6
    assert choose_depth(slo(constraints={"min_agreement": 0.8}, breach_window={"limit": 10}), REPO, "small").depth == 8
    assert choose_depth(slo(constraints={"p95_tpot_s": 0.001}), REPO, "small") is None


def test_live_exits_refine_the_breach_estimate():
    profile = REPO.candidates["small"]
    assert expected_breach_share(profile, 4) == pytest.approx(0.4)  # repository, full-depth exits
    assert expected_breach_share(profile, 8) == 0.0
    at_4 = IntervalStats(depth=4, tokens_per_exit_layer=Counter({4: 100}), breaches=50, generated_tokens=100)
    assert expected_breach_share(profile, 4, at_4) == 0.5  # measured
    assert expected_breach_share(profile, 6, at_4) == pytest.approx(0.5 * 0.2 / 0.4)  # spread as the repository
    at_8 = IntervalStats(depth=8, tokens_per_exit_layer=Counter({4: 30, 6: 50, 8: 20}), generated_tokens=100)
    assert expected_breach_share(profile, 4, at_8) == pytest.approx(0.7)  # exact from the live exits
    assert expected_breach_share(profile, 6, at_8) == pytest.approx(0.2)


def step(tokens: int, breaches: int, finished: int = 0) -> StepStats:
    done = tuple(FinishedRequest(f"r{i}", 5, 10, "length", 0.0, 0.5, 2.3) for i in range(finished))
    return StepStats(0.01, 0, tokens, {4: tokens}, breaches, 0, tokens, 0, 0.1, 4, done)


def test_breach_window_counts_the_last_tokens_only():
    window = BreachWindow(tokens=10)
    window.observe(step(6, 6))
    assert window.count == 6 and not window.exceeds(6)
    window.observe(step(4, 0))
    assert window.count == 6 and len(window.flags) == 10
    window.observe(step(4, 0))  # pushes out 4 of the 6 breaching tokens
    assert window.count == 2
    window.observe(step(10, 5))  # spread evenly: 5 of 10, whole window replaced
    assert window.count == 5 and list(window.flags) == [False, True] * 5
    window.observe(step(20, 20))
    assert window.count == 10 and window.exceeds(9)


def test_interval_stats_from_step_records():
    interval = IntervalStats(depth=4)
    for _ in range(3):
        interval.observe(step(10, 2, finished=1))
    assert (interval.generated_tokens, interval.breaches, interval.finished_requests) == (30, 6, 3)
    assert interval.breach_share() == pytest.approx(0.2)
    assert interval.ttft_s == [0.5] * 3 and interval.tpot_s == pytest.approx([0.2] * 3)


def two_depths(**hysteresis):
    config = parse_slo({"model": "m", "memory_budget": "600MiB", "constraints": {"min_agreement": 0.0},
                        "candidates": [{"id": "small", "depths": [4, 8]}], "hysteresis": hysteresis})
    return config, repository(small=small())


EASY = dict(tokens_per_exit_layer=Counter({4: 90, 8: 10}), generated_tokens=100, finished_requests=150)


def phase(depth: int, easy: bool) -> tuple[IntervalStats, int]:
    """One interval of recorded telemetry at `depth`; easy: 10% of tokens want 8 layers, hard: 80%."""
    want_8 = 10 if easy else 80
    if depth == 8:
        exits = Counter({4: 100 - want_8, 8: want_8})
        return IntervalStats(8, exits, 0, 100, finished_requests=150), 0
    return IntervalStats(4, Counter({4: 100}), want_8, 100, finished_requests=150), want_8


def run(config, repo, phases: list[bool]):
    decision, state = start(config, repo)
    decisions = [decision]
    for easy in phases:
        live, in_window = phase(state.depth, easy)
        trigger = "breaches" if in_window > config.breach_window.limit else "interval"
        decision, state = reassess(config, repo, state, live, in_window, trigger)
        decisions.append(decision)
    return decisions


def test_hysteresis_alternating_workload_does_not_flap():
    config, repo = two_depths()
    decisions = run(config, repo, [False, True] * 10)
    assert decisions[0].depth == 4  # the repository says 40% breaches: under the limit of 50
    changes = [d for d in decisions[1:] if d.changed]
    assert [(d.action, d.trigger) for d in changes] == [("deepen", "breaches")]  # deepen once, for safety
    assert decisions[-1].depth == 8
    # the same trace without hysteresis flaps at every reassessment
    config, repo = two_depths(min_gain=1.0, stable_reassessments=1, min_requests_between_changes=0)
    flapping = [d for d in run(config, repo, [False, True] * 10)[1:] if d.changed]
    assert len(flapping) >= 18


def test_lasting_easy_traffic_shrinks_after_the_stable_count():
    config, repo = two_depths()
    decisions = run(config, repo, [False] + [True] * 3)
    assert [d.action for d in decisions[1:]] == ["deepen", "stay", "shrink", "stay"]
    assert "seen 1/2" in decisions[2].reason and decisions[3].reason.startswith("gain: ")


def test_breaches_choose_the_cheaper_of_deepen_and_switch():
    config = slo(constraints={"min_quality": 0.4, "min_agreement": 0.8})
    state = ControllerState("small", 4)
    live = IntervalStats(4, Counter({4: 100}), 70, 100, finished_requests=20)
    decision, after = reassess(config, REPO, state, live, breaches_in_window=70, trigger="breaches")
    assert (decision.action, after.candidate, after.depth) == ("deepen", "small", 6)  # 420 tok/s vs mid's 300
    assert decision.reason.startswith("safety: 70 breaches")
    fast_mid = repository(small=small(), mid=candidate(num_layers=8, depths={8: dict(
        throughput={1: 40.0, 8: 300.0, 32: 900.0}, reference_agreement=0.6)}))
    decision, after = reassess(config, fast_mid, state, live, breaches_in_window=70, trigger="breaches")
    assert (decision.action, after.candidate) == ("switch", "mid")
    record = json.loads(json.dumps(decision.to_dict()))  # every decision is a JSON record
    assert record["previous_candidate"] == "small" and record["inputs"]["breaches_in_window"] == 70
    assert {o["candidate"] for o in record["options"]} == {"small", "mid"}


def test_a_candidate_left_for_breaches_is_not_chosen_back_for_a_gain():
    """Breaches force `small` (one depth, so no deeper load) onto `mid`; the repository still rates
    `small` 1.67x better, but it is not chosen back until BREACH_MEMORY_INTERVALS have passed."""
    from controller.history import resume_state
    from controller.reassess import BREACH_MEMORY_INTERVALS

    config = slo(candidates=[{"id": "small", "depths": [4]}, {"id": "mid", "depths": [8]}],
                 constraints={"min_quality": 0.4, "min_agreement": 0.8},
                 hysteresis={"stable_reassessments": 1, "min_requests_between_changes": 0}, reassess_every=10)
    repo = repository(small=small(), mid=mid())
    live = IntervalStats(4, Counter({4: 100}), 70, 100, finished_requests=10)
    decision, state = reassess(config, repo, ControllerState("small", 4), live, breaches_in_window=70,
                               trigger="breaches")
    assert (decision.action, state.candidate) == ("switch", "mid") and state.breached == (("small", 4, 10),)
    calm = {"mid": IntervalStats(8, Counter({8: 100}), 0, 100, finished_requests=10),
            "small": IntervalStats(4, Counter({4: 100}), 0, 100, finished_requests=10)}
    actions = []
    for _ in range(BREACH_MEMORY_INTERVALS + 1):
        decision, state = reassess(config, repo, state, calm[state.candidate], breaches_in_window=0)
        actions.append(decision.action)
    assert actions == ["stay"] * (BREACH_MEMORY_INTERVALS - 1) + ["switch", "stay"]
    assert state.candidate == "small" and state.breached == ()
    # a restarted controller keeps the mark: its history holds the safety switch
    first = reassess(config, repo, ControllerState("small", 4), live, breaches_in_window=70, trigger="breaches")[0]
    resumed = resume_state([{"kind": "decision", **json.loads(json.dumps(first.to_dict()))}])
    assert resumed.breached == (("small", 4, 10),)
