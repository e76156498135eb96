"""Load test: N requests with Poisson arrivals against a running OpenAI-compatible server.

    helios serve &                                   # or any config
    python bench/load.py --base-url http://127.0.0.1:8000 --model smollm2-135m --num-requests 1000

Without --rate, the rate is --overload (default 2) x the saturation rate, measured first: a closed
loop of --saturation-concurrency clients sending --saturation-requests requests; completed requests
per second is the saturation rate. Every request must end: a 200, or an early 429/503 with
Retry-After; none may be lost or outlive its --timeout. Reported: outcomes by status, latency
percentiles of each outcome, and the peak RSS of every Ray process on this machine (sampled).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))

RAY_TITLES = ("ray::", "raylet", "gcs_server", "dashboard", "log_monitor")


@dataclass
class Outcome:
    status: str  # the HTTP status, or "timeout" / "error: ..." when no status came
    seconds: float
    retry_after: str | None = None


async def one_request(http: httpx.AsyncClient, body: dict, timeout_s: float) -> Outcome:
    started = time.monotonic()
    try:
        response = await http.post("/v1/completions", json=body, timeout=timeout_s)
        return Outcome(str(response.status_code), time.monotonic() - started, response.headers.get("retry-after"))
    except httpx.TimeoutException:
        return Outcome("timeout", time.monotonic() - started)
    except httpx.HTTPError as exc:
        return Outcome(f"error: {type(exc).__name__}", time.monotonic() - started)


async def saturation_rate(http: httpx.AsyncClient, body: dict, concurrency: int, requests: int,
                          timeout_s: float) -> float:
    """Requests per second the server completes with `concurrency` clients always waiting on it."""
    remaining = iter(range(requests))
    done = 0

    async def client() -> None:
        nonlocal done
        for _ in remaining:
            # await first, then add: `done += await ...` reads `done` before the await, so the 32
            # clients overwrote each other's counts (the first run measured 0.28/s instead of ~9/s)
            ok = (await one_request(http, body, timeout_s)).status == "200"
            done += ok

    started = time.monotonic()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return done / (time.monotonic() - started)


async def poisson_load(http: httpx.AsyncClient, body: dict, count: int, rate: float, timeout_s: float,
                       seed: int = 0) -> tuple[list[Outcome], float]:
    """`count` requests, exponential gaps of mean 1/rate between sends (not waiting for answers);
    also the seconds the sending took (a starved client sends slower than asked: compare)."""
    gaps = random.Random(seed)
    tasks = []
    started = time.monotonic()
    for _ in range(count):
        tasks.append(asyncio.create_task(one_request(http, body, timeout_s)))
        await asyncio.sleep(gaps.expovariate(rate))
    sending = time.monotonic() - started
    return list(await asyncio.gather(*tasks)), sending


class RSSSampler:
    """Peak resident memory of each Ray process, sampled every `interval_s`: the processes under
    `server_pid` (e.g. `helios serve`), or every Ray process on the machine when it is None."""

    def __init__(self, server_pid: int | None = None, interval_s: float = 0.5):
        self.server_pid, self.interval_s = server_pid, interval_s
        self.peaks: dict[int, int] = {}
        self.names: dict[int, str] = {}  # a Ray worker's title changes with the method it runs: keep the first
        self._task: asyncio.Task | None = None

    def _processes(self) -> list[psutil.Process]:
        if self.server_pid is None:
            return list(psutil.process_iter())
        root = psutil.Process(self.server_pid)
        return [root, *root.children(recursive=True)]

    def sample(self) -> None:
        for process in self._processes():
            try:
                title, rss = " ".join(process.cmdline()), process.memory_info().rss
            except psutil.Error:  # ended between listing and reading
                continue
            if self.server_pid is None and not title.startswith(RAY_TITLES) and "/ray/" not in title.split(" ")[0]:
                continue
            self.names.setdefault(process.pid, f"{title.split(' ')[0].rsplit('/', 1)[-1][:60]} (pid {process.pid})")
            self.peaks[process.pid] = max(self.peaks.get(process.pid, 0), rss)

    async def _run(self) -> None:
        while True:
            await asyncio.to_thread(self.sample)
            await asyncio.sleep(self.interval_s)

    def __enter__(self) -> "RSSSampler":
        self._task = asyncio.create_task(self._run())
        return self

    def __exit__(self, *_) -> None:
        self._task.cancel()

    def peaks_mib(self) -> dict[str, float]:
        return dict(sorted((self.names[pid], round(rss / 2**20, 1)) for pid, rss in self.peaks.items()))


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summarize(outcomes: list[Outcome], sent: int, timeout_s: float) -> dict:
    by_status = Counter(o.status for o in outcomes)
    latency = {}
    for status in sorted(by_status):
        seconds = [o.seconds for o in outcomes if o.status == status]
        latency[status] = {"p50_s": round(percentile(seconds, 0.5), 3), "p99_s": round(percentile(seconds, 0.99), 3),
                           "max_s": round(max(seconds), 3)}
    refused = [o for o in outcomes if o.status in ("429", "503")]
    return {"sent": sent, "answered": len(outcomes), "lost": sent - len(outcomes),
            "by_status": dict(sorted(by_status.items())), "latency": latency,
            "hung": sum(o.seconds >= timeout_s for o in outcomes),
            "refused_without_retry_after": sum(o.retry_after is None for o in refused)}


async def run_load(base_url: str, model: str, count: int, rate: float | None = None, overload: float = 2.0,
                   max_tokens: int = 16, timeout_s: float = 60.0, saturation_concurrency: int = 32,
                   saturation_requests: int = 64, headers: dict | None = None,
                   server_pid: int | None = None) -> dict:
    body = {"model": model, "prompt": "Write one sentence about the sea.", "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=base_url, limits=limits, headers=headers) as http:
        saturation = None
        if rate is None:
            await one_request(http, body, timeout_s)  # warm-up: the first request pays one-off costs
            saturation = await saturation_rate(http, body, saturation_concurrency, saturation_requests, timeout_s)
            if saturation == 0:  # seen when the machine's memory monitor killed the replica meanwhile
                raise SystemExit(f"no request succeeded while measuring saturation ({saturation_requests} sent)")
            rate = overload * saturation
        load_before = os.getloadavg()
        with RSSSampler(server_pid) as rss:
            started = time.monotonic()
            outcomes, sending = await poisson_load(http, body, count, rate, timeout_s)
            wall = time.monotonic() - started
    report = summarize(outcomes, count, timeout_s)
    report.update({"rate_per_s": round(rate, 3), "saturation_per_s": saturation and round(saturation, 3),
                   "sent_per_s": round(count / sending, 3), "wall_s": round(wall, 1), "max_tokens": max_tokens,
                   "timeout_s": timeout_s, "peak_rss_mib": rss.peaks_mib(),
                   # other jobs on the machine: 1-, 5- and 15-minute load averages before and after
                   "load_average": {"before": [round(x, 2) for x in load_before],
                                    "after": [round(x, 2) for x in os.getloadavg()]}})
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--num-requests", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=None, help="requests/s (default: --overload x saturation)")
    parser.add_argument("--overload", type=float, default=2.0)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--timeout", type=float, default=120.0, help="per request, seconds")
    parser.add_argument("--saturation-concurrency", type=int, default=32)
    parser.add_argument("--saturation-requests", type=int, default=64)
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--server-pid", type=int, default=None,
                        help="report the RSS of this process's descendants (default: every Ray process here)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    headers = {"authorization": f"Bearer {args.api_key}"} if args.api_key else None
    report = asyncio.run(run_load(args.base_url, args.model, args.num_requests, args.rate, args.overload,
                                  args.max_tokens, args.timeout, args.saturation_concurrency,
                                  args.saturation_requests, headers, args.server_pid))
    from common import machine

    report = {"command": " ".join(sys.argv), "machine": machine(), **report}
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
