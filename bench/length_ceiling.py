"""The most length-aware scheduling can cut mean latency on a workload: a slot model of the engine.

The engine decodes up to `slots` sequences per step, one token each. Here a step takes one
time unit whatever it holds, a request's first token comes in the step that admits it, and a
request finishes when it has made its true number of tokens. Two schedules of the same
requests (lengths, arrival times in steps):

- `fcfs`: free slots go to waiting requests in arrival order; a running request keeps its slot;
- `srpt`: every step the `slots` requests with the least true remaining work run (the others
  wait with their progress kept): what `spf` with aging 0, perfect predictions and a lookahead
  large enough to hold every waiting request does.

The ratio of their mean latencies is the ceiling for `spf-oracle` over `fcfs` on that workload:
the real engine adds prefill, step times that vary with the batch, and predictions that err.
`bench/serving.py --compare-policies` reports it beside every measured ratio, from the same
requests' greedy lengths and Poisson arrivals.
"""

from __future__ import annotations

import heapq
import math
import random
import statistics


def arrival_times(count: int, rate: float, seed: int) -> list[float]:
    """Arrival of each request in seconds: `bench/serving.py`'s Poisson gaps (inf: all at 0)."""
    rng, now, times = random.Random(seed), 0.0, []
    for _ in range(count):
        times.append(now)
        if math.isfinite(rate):
            now += rng.expovariate(rate)
    return times


def latencies(lengths: list[int], arrivals: list[float], slots: int, policy: str) -> list[int]:
    """Steps from each request's arrival step to the end of the step that makes its last token.
    `policy`: "fcfs" or "srpt"."""
    if policy not in ("fcfs", "srpt"):
        raise ValueError(f"unknown policy {policy!r}")
    order = sorted(range(len(lengths)), key=lambda i: arrivals[i])
    arrive = {i: math.ceil(arrivals[i]) for i in order}
    remaining = {i: max(1, lengths[i]) for i in order}
    waiting: list[tuple[float, int]] = []  # heap: (key, request)
    running: list[int] = []
    done: dict[int, int] = {}
    step, next_arrival = 0, 0
    while len(done) < len(lengths):
        while next_arrival < len(order) and arrive[order[next_arrival]] <= step:
            i = order[next_arrival]
            heapq.heappush(waiting, (arrivals[i] if policy == "fcfs" else remaining[i], i))
            next_arrival += 1
        if policy == "srpt":  # everything competes every step: the least remaining work runs
            for i in running:
                heapq.heappush(waiting, (remaining[i], i))
            running = []
        while waiting and len(running) < slots:
            running.append(heapq.heappop(waiting)[1])
        if not running:  # idle until the next arrival
            step = arrive[order[next_arrival]]
            continue
        step += 1
        for i in running:
            remaining[i] -= 1
            if remaining[i] == 0:
                done[i] = step - arrive[i]
        running = [i for i in running if remaining[i] > 0]
    return [done[i] for i in range(len(lengths))]


def ceiling(lengths: list[int], arrivals_s: list[float], slots: int, step_s: float) -> dict:
    """FCFS over SRPT on the slot model: mean and p99 latency (in steps) and their ratios."""
    arrivals = [t / step_s for t in arrivals_s]
    fcfs, srpt = (latencies(lengths, arrivals, slots, p) for p in ("fcfs", "srpt"))
    p99 = lambda xs: sorted(xs)[min(len(xs) - 1, math.ceil(0.99 * len(xs)) - 1)]  # noqa: E731
    return {"slots": slots, "step_s": step_s, "fcfs_mean_steps": statistics.fmean(fcfs),
            "srpt_mean_steps": statistics.fmean(srpt), "mean_speedup": statistics.fmean(fcfs) / statistics.fmean(srpt),
            "p99_ratio": p99(srpt) / p99(fcfs)}
