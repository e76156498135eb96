"""The LLM-aware autoscaling policy (`autoscaling.policy: helios`) and the TTFT signal it reads.

Serve's default policy sizes a deployment by ongoing requests alone: replicas = ongoing /
target_ongoing_requests. For an LLM engine that is half the story: a replica batching 16 short
requests is fine, one whose queue makes new requests wait seconds for their first token is not,
at the same count. This policy (in the spirit of Ray Serve LLM's TTFT-based scaling; this Ray,
2.60, ships no LLM policy of its own) scales up in proportion to the worse of two pressures,
by at least one replica once either is over 1:

- load: ongoing requests (running + waiting in the engines + queued in Serve's handles, Serve's
  own count) per replica over `target_ongoing_requests`;
- latency: each replica's recent time to first token (p95 over the look-back window, raised to
  the age of the oldest request still waiting for its first token, so a growing queue shows
  before its requests finish) over `target_ttft_s`. Replicas report it through Serve's custom
  metrics API (`LLMServer.record_autoscaling_stats`), and Serve averages it over
  `look_back_period_s`.

Hysteresis twice over: Serve applies `upscale_delay_s` / `downscale_delay_s` to whatever this
policy returns (a change must be wanted that long without a break), and the policy itself only
shrinks to a count that would run at most DOWNSCALE_FILL of the target with TTFT under
DOWNSCALE_TTFT of its target; in between it holds, so load near the target never flaps.

`desired_replicas` is a pure function (tests/test_autoscaling.py); `HeliosAutoscalingPolicy`
adapts it to Serve's context. Serve pickles this module by value into its controller, so it
imports nothing heavy (no torch, no Helios engine).
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

TTFT_METRIC = "helios_ttft_s"  # the custom metric each replica reports (seconds)
DOWNSCALE_FILL = 0.7  # shrink only to a count that would run at most this share of the target load
DOWNSCALE_TTFT = 0.5  # ... and only while TTFT is under this share of its target
POLICY_PATH = "deployments.autoscaling:HeliosAutoscalingPolicy"  # Serve's `policy_function`


@dataclass(frozen=True)
class Signals:
    """What the policy sees of one deployment at one decision."""

    current: int  # running replicas
    ongoing: float  # requests in the deployment: running + waiting in engines + queued at handles
    ttft_s: float  # the worst replica's recent TTFT signal (0 when none reported)


@dataclass(frozen=True)
class Targets:
    target_ongoing: float  # ongoing requests per replica the deployment is sized for
    target_ttft_s: float  # p95 time to first token to stay under
    min_replicas: int
    max_replicas: int


def desired_replicas(signals: Signals, targets: Targets) -> int:
    """Replicas wanted now (before Serve's delays): up on either pressure, down only with margin."""
    current = signals.current
    if current <= 0:  # nothing running: start what the load needs (Serve also fast-paths this)
        needed = math.ceil(signals.ongoing / targets.target_ongoing) if signals.ongoing > 0 else 0
        return _bounded(needed, targets)
    load = signals.ongoing / (targets.target_ongoing * current)
    latency = signals.ttft_s / targets.target_ttft_s
    pressure = max(load, latency)
    if pressure > 1.0:  # proportional, and at least one more: a 10% overshoot still needs a replica
        return _bounded(max(current + 1, math.ceil(current * pressure)), targets)
    if latency <= DOWNSCALE_TTFT:
        fits = math.ceil(signals.ongoing / (targets.target_ongoing * DOWNSCALE_FILL))
        if fits < current:
            return _bounded(fits, targets)
    return _bounded(current, targets)


def _bounded(replicas: int, targets: Targets) -> int:
    return max(targets.min_replicas, min(targets.max_replicas, replicas))


class HeliosAutoscalingPolicy:
    """Serve's custom policy (`AutoscalingPolicy(policy_function=POLICY_PATH, policy_kwargs=...)`).

    Serve instantiates it once per deployment with `policy_kwargs` and calls it with an
    `AutoscalingContext` every control-loop tick; it wraps the result with the configured
    delays, scaling factors and min/max bounds.
    """

    def __init__(self, target_ttft_s: float = 2.0):
        self.target_ttft_s = target_ttft_s

    def __call__(self, ctx: Any) -> tuple[int, dict]:
        config = ctx.config
        targets = Targets(config.get_target_ongoing_requests(), self.target_ttft_s,
                          ctx.capacity_adjusted_min_replicas, ctx.capacity_adjusted_max_replicas)
        signals = Signals(ctx.current_num_replicas, float(ctx.total_num_requests or 0.0),
                          worst_ttft(ctx.aggregated_metrics))
        return desired_replicas(signals, targets), {}  # no state of its own: Serve keeps the delays'


def worst_ttft(aggregated_metrics: dict | None) -> float:
    """The highest TTFT signal among the replicas' averaged reports (0 when none reported yet)."""
    per_replica = (aggregated_metrics or {}).get(TTFT_METRIC) or {}
    return max(per_replica.values(), default=0.0)


class TTFTWindow:
    """One replica's TTFT signal: p95 of the TTFTs seen in the last `window_s`, raised to the age
    of the oldest request still without a first token (that request's TTFT will be at least this)."""

    def __init__(self, window_s: float, clock: Callable[[], float] = time.monotonic, max_samples: int = 1024):
        self.window_s, self.clock = window_s, clock
        self._recent: deque[tuple[float, float]] = deque(maxlen=max_samples)  # (when, ttft)
        self._pending: dict[int, float] = {}  # request key -> start
        self._next_key = 0

    def started(self) -> int:
        """A request began; the key passes to `first_token` / `ended`."""
        self._next_key += 1
        self._pending[self._next_key] = self.clock()
        return self._next_key

    def first_token(self, key: int) -> None:
        start = self._pending.pop(key, None)
        if start is not None:
            now = self.clock()
            self._recent.append((now, now - start))

    def ended(self, key: int) -> None:
        """The request is over (its first token may never have come: an error, a cancelled stream)."""
        self._pending.pop(key, None)

    def value(self) -> float:
        now = self.clock()
        while self._recent and now - self._recent[0][0] > self.window_s:
            self._recent.popleft()
        recent = sorted(ttft for _, ttft in self._recent)
        p95 = recent[min(len(recent) - 1, math.ceil(0.95 * len(recent)) - 1)] if recent else 0.0
        oldest = now - min(self._pending.values()) if self._pending else 0.0
        return max(p95, oldest)
