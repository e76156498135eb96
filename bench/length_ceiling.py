"""The most length-aware scheduling can cut mean latency on a workload: a slot model of the engine.

    python bench/length_ceiling.py --caps 128,512 --json bench/results/length_ceiling.json

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


async def _greedy_lengths(source: str, prompts: list[str], max_tokens: int) -> list[int]:
    """Each prompt's greedy answer length on the engine (all at once), as the oracle's truth."""
    from argparse import Namespace

    import serving

    args = Namespace(source=source, kv_cache_memory=512 << 20, max_num_seqs=64, length_head=None, length_aging=0.0,
                     natural_lengths=True, max_tokens=max_tokens)
    engine = serving.policy_engine(args, "fcfs")
    try:
        truth = await serving.greedy_lengths(engine, args, prompts)
    finally:
        engine.shutdown()
    return [truth[p] for p in prompts]


def main() -> None:
    """Ceilings per answer cap: true lengths from the engine (or --lengths, a JSON of them per cap)."""
    import argparse
    import asyncio
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from common import machine
    from helios.tuning.datasets import SHARED_DATA, load_prompts

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dataset", default=str(SHARED_DATA / "self_instruct_seed_tasks.jsonl"))
    parser.add_argument("--num-prompts", type=int, default=128)
    parser.add_argument("--caps", default="128,512", help="answer caps (max_tokens), comma-separated")
    parser.add_argument("--lengths", default=None, help="JSON {cap: [lengths]} of an earlier run, instead of generating")
    parser.add_argument("--slots", type=int, default=16, help="decode rows per step (the engine's max_num_seqs)")
    parser.add_argument("--step-s", type=float, default=0.17, help="seconds a step takes (places Poisson arrivals)")
    parser.add_argument("--rates", default="inf,0.5,1,2", help="requests/s; inf = all at once")
    parser.add_argument("--backlogs", default="64,128,1024", help="all-at-once request counts (resampled past the data)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    prompts = load_prompts(args.dataset, args.num_prompts)
    given = json.loads(Path(args.lengths).read_text()) if args.lengths else {}
    report = {"command": "python " + " ".join(sys.argv), "machine": machine(), "dataset": args.dataset,
              "slots": args.slots, "step_s": args.step_s, "caps": {}}
    for cap in (int(c) for c in args.caps.split(",")):
        lengths = given.get(str(cap)) or asyncio.run(_greedy_lengths(args.model, prompts, cap))
        rng = random.Random(0)
        row = {"lengths": lengths, "mean_length": statistics.fmean(lengths),
               "share_at_cap": sum(n >= cap for n in lengths) / len(lengths), "all_at_once": {}, "poisson": {}}
        for count in (int(n) for n in args.backlogs.split(",")):
            sample = lengths[:count] if count <= len(lengths) else [rng.choice(lengths) for _ in range(count)]
            row["all_at_once"][count] = ceiling(sample, arrival_times(count, math.inf, 0), args.slots, args.step_s)
        for rate in (float(r) for r in args.rates.split(",") if r != "inf"):
            row["poisson"][rate] = ceiling(lengths, arrival_times(len(lengths), rate, 0), args.slots, args.step_s)
        report["caps"][cap] = row
        print(f"cap {cap}: mean length {row['mean_length']:.1f}, {row['share_at_cap']:.0%} at the cap; ceiling "
              + ", ".join(f"{n} at once {c['mean_speedup']:.2f}x" for n, c in row["all_at_once"].items())
              + "".join(f", {r}/s {c['mean_speedup']:.2f}x" for r, c in row["poisson"].items()), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
