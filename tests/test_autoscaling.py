"""The `helios` autoscaling policy: the pure decision, its Serve adapter run through Serve's own
wrapper (delays and bounds) on a fake clock, the TTFT signal, and the config that carries it."""

import pytest
from ray.serve import autoscaling_policy as serve_policy
from ray.serve.config import AutoscalingConfig as ServeAutoscalingConfig, AutoscalingContext

from deployments.app import build_app_from_config, replica_count
from deployments.autoscaling import (DOWNSCALE_FILL, POLICY_PATH, TTFT_METRIC, HeliosAutoscalingPolicy, Signals,
                                     Targets, TTFTWindow, desired_replicas, worst_ttft)
from deployments.config import ConfigError, parse_config

TARGETS = Targets(target_ongoing=4, target_ttft_s=1.0, min_replicas=1, max_replicas=4)


def want(current: int, ongoing: float, ttft_s: float = 0.0, targets: Targets = TARGETS) -> int:
    return desired_replicas(Signals(current, ongoing, ttft_s), targets)


def test_scales_up_on_a_long_queue():
    assert want(1, ongoing=4) == 1  # at the target: hold
    assert want(1, ongoing=5) == 2  # a little over: one more
    assert want(1, ongoing=12) == 3  # proportional
    assert want(2, ongoing=9) == 3


def test_scales_up_on_slow_ttft_at_a_load_that_looks_fine():
    assert want(2, ongoing=2, ttft_s=0.9) == 2
    assert want(2, ongoing=2, ttft_s=1.2) == 3  # the queue count alone would hold (or shrink)
    assert want(2, ongoing=2, ttft_s=3.0) == 4  # proportional to the overshoot, bounded by max


def test_scales_down_when_idle_only_with_margin():
    assert want(3, ongoing=0) == 1
    assert want(3, ongoing=5) == 2  # 5 fits in 2 at 0.625 of the target (under DOWNSCALE_FILL)
    assert want(2, ongoing=4 * DOWNSCALE_FILL + 0.5) == 2  # would run 1 replica over the fill: hold
    assert want(3, ongoing=0, ttft_s=0.6) == 3  # TTFT above half its target: no shrinking yet


def test_bounded_by_min_and_max():
    small = Targets(target_ongoing=4, target_ttft_s=1.0, min_replicas=2, max_replicas=3)
    assert want(2, ongoing=100, targets=small) == 3
    assert want(3, ongoing=0, targets=small) == 2
    assert want(0, ongoing=0, targets=small) == 2  # below min (e.g. at start): up to min
    assert want(0, ongoing=9) == 3  # cold: what the load needs


def test_no_flapping_around_the_target():
    """Load oscillating within the band between the downscale fill and the target never moves
    the count, whichever count it starts from."""
    for current in (1, 2, 3):
        band = [current * 4 * f for f in (DOWNSCALE_FILL + 0.01, 0.8, 0.9, 1.0, 0.85, 0.75)]
        assert {want(current, ongoing) for ongoing in band} == {current}
    # after a scale-up to n, the load that caused it never asks for fewer than n
    for ongoing in (5, 9, 13):
        up = want(1, ongoing) if ongoing <= 8 else want(2, ongoing)
        assert want(up, ongoing) >= up


def test_ttft_window_p95_and_the_oldest_pending_request():
    now = [0.0]
    window = TTFTWindow(window_s=10, clock=lambda: now[0])
    assert window.value() == 0.0
    for ttft in [0.1] * 19 + [2.0]:  # 20 requests: p95 is the 19th smallest
        key = window.started()
        now[0] += ttft
        window.first_token(key)
        window.ended(key)
    assert window.value() == pytest.approx(0.1)
    stuck = window.started()  # a request waiting for its first token raises the signal as it waits
    now[0] += 3.0
    assert window.value() == pytest.approx(3.0)
    window.ended(stuck)  # cancelled before its first token: it no longer counts
    assert window.value() == pytest.approx(0.1)
    now[0] += 11  # older than the window: forgotten
    assert window.value() == 0.0


def _context(config: ServeAutoscalingConfig, current: int, target: int, ongoing: float, ttft: float,
             state: dict) -> AutoscalingContext:
    return AutoscalingContext(
        deployment_id=None, deployment_name="LLMServer:tiny", app_name="helios", current_num_replicas=current,
        target_num_replicas=target, running_replicas=[], total_num_requests=ongoing, total_queued_requests=0,
        aggregated_metrics={TTFT_METRIC: {"r1": ttft, "r2": ttft / 2}}, raw_metrics={},
        capacity_adjusted_min_replicas=config.min_replicas, capacity_adjusted_max_replicas=config.max_replicas,
        policy_state=state, last_scale_up_time=None, last_scale_down_time=None, current_time=None, config=config)


def test_serve_applies_its_delays_to_the_policy(monkeypatch):
    """The policy through Serve's own wrapper (as its controller runs it), on a fake clock: a
    change happens only after being wanted for the whole delay, and a one-tick spike does nothing."""
    clock = [1000.0]
    monkeypatch.setattr(serve_policy.time, "time", lambda: clock[0])
    config = ServeAutoscalingConfig(min_replicas=1, max_replicas=3, target_ongoing_requests=4,
                                    upscale_delay_s=2, downscale_delay_s=5,
                                    policy={"policy_function": POLICY_PATH, "policy_kwargs": {"target_ttft_s": 1.0}})
    policy = serve_policy._apply_autoscaling_config(HeliosAutoscalingPolicy(target_ttft_s=1.0))
    replicas, state, history = 1, {}, []

    def tick(ongoing: float, ttft: float = 0.0) -> int:
        nonlocal replicas, state
        replicas, state = policy(_context(config, replicas, replicas, ongoing, ttft, state))
        history.append(replicas)
        clock[0] += 0.5
        return replicas

    tick(20)  # one tick of a spike
    assert [tick(2) for _ in range(6)] == [1] * 6  # gone before the upscale delay: nothing
    assert [tick(2, ttft=1.5) for _ in range(4)] == [1, 1, 1, 1]  # slow TTFT, waited 1.5 s of 2
    assert tick(2, ttft=1.5) == 2  # wanted for 2 s: up
    assert [tick(0) for _ in range(10)] == [2] * 10  # idle for 4.5 s of the 5 s downscale delay
    assert tick(0) == 1
    assert max(history) == 2 and history.count(2) == 11


def test_worst_ttft_reads_the_replicas_reports():
    assert worst_ttft(None) == 0.0 and worst_ttft({}) == 0.0
    assert worst_ttft({TTFT_METRIC: {"a": 0.2, "b": 0.7}, "other": {"a": 9.0}}) == 0.7


def test_config_refuses_replicas_with_autoscaling_and_names_the_key():
    with pytest.raises(ConfigError, match=r"models\.0\.autoscaling: .*either replicas \(3, fixed\) or autoscaling"):
        parse_config({"models": [{"id": "a", "replicas": 3, "autoscaling": {"max_replicas": 4}}]})
    with pytest.raises(ConfigError, match=r"models\.0\.autoscaling: .*max_replicas \(1\) is below min_replicas \(2\)"):
        parse_config({"models": [{"id": "a", "autoscaling": {"min_replicas": 2, "max_replicas": 1}}]})
    with pytest.raises(ConfigError, match=r"models\.0\.autoscaling\.policy: "):
        parse_config({"models": [{"id": "a", "autoscaling": {"policy": "ttft"}}]})


def test_app_passes_the_autoscaling_config_to_serve():
    config = parse_config({"models": [
        {"id": "fixed", "replicas": 2},
        {"id": "auto", "autoscaling": {"min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 6,
                                       "target_ttft_s": 0.5, "upscale_delay_s": 4, "downscale_delay_s": 60}},
        {"id": "auto-default", "autoscaling": {"policy": "default"}}]})
    fixed, auto, plain = config.models
    assert replica_count(fixed) == {"num_replicas": 2}
    assert replica_count(plain)["autoscaling_config"].get("policy") is None
    app = build_app_from_config(config)
    servers = {d.name: d for d in _deployments(app)}
    serve_config = servers["LLMServer:auto"]._deployment_config.autoscaling_config
    assert (serve_config.min_replicas, serve_config.max_replicas, serve_config.target_ongoing_requests) == (1, 3, 6)
    assert (serve_config.upscale_delay_s, serve_config.downscale_delay_s) == (4, 60)
    assert serve_config.policy.policy_function == POLICY_PATH
    assert serve_config.policy.policy_kwargs == {"target_ttft_s": 0.5}
    assert isinstance(serve_config.policy.get_policy()(**serve_config.policy.policy_kwargs), HeliosAutoscalingPolicy)
    assert servers["LLMServer:fixed"]._deployment_config.autoscaling_config is None
    assert servers["LLMServer:fixed"].num_replicas == 2
    assert servers["LLMServer:auto-default"]._deployment_config.autoscaling_config.policy.is_default_policy_function()


def _deployments(app) -> list:
    """The deployments bound into an application (the ingress and, through its arguments, the servers)."""
    ingress = app._bound_deployment
    servers = ingress.init_args[0]
    return [ingress] + [server._bound_deployment if hasattr(server, "_bound_deployment") else server
                        for server in servers.values()]


def test_rayservice_carries_the_autoscaling_config():
    from pathlib import Path

    from deployments.render_rayservice import read_config, serve_config

    example = Path(__file__).parents[1] / "deployments" / "configs" / "example.yaml"
    args = serve_config(read_config(example))["applications"][0]["args"]
    model = parse_config(args).models[0]  # what build_app parses inside the cluster
    assert model.autoscaling is not None and model.autoscaling.policy == "helios"
    assert replica_count(model)["autoscaling_config"]["policy"]["policy_function"] == POLICY_PATH


def test_ttft_calls_for_a_replica_where_serves_default_policy_would_not():
    """The multi-node test's situation: 6 requests against a target of 100 per replica, first tokens
    slow. Serve's default policy (same context, same wrapper-free call) holds at one; helios adds one."""
    config = ServeAutoscalingConfig(min_replicas=1, max_replicas=2, target_ongoing_requests=100)
    context = _context(config, current=1, target=1, ongoing=6, ttft=0.5, state={})
    default_wants, _ = serve_policy.replica_queue_length_autoscaling_policy(context)
    assert max(config.min_replicas, round(default_wants)) == 1
    assert HeliosAutoscalingPolicy(target_ttft_s=0.05)(context)[0] == 2
