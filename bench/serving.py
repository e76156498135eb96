"""Online serving benchmark, vLLM's conventions, against any OpenAI-compatible endpoint.

    # an endpoint that is already up (helios serve, vLLM, ...)
    python bench/serving.py --base-url http://127.0.0.1:8000 --model smollm2-135m --request-rate 4
    # Helios over HTTP vs the in-process engine, same prompts, 3 alternating pairs (starts and stops Ray itself)
    python bench/serving.py --compare-in-process --repeat 3 --num-prompts 64 --max-tokens 128 --json out.json
    # scheduling policies side by side, in-process, answers of their natural length, at several rates
    python bench/serving.py --compare-policies fcfs,spf --length-head smollm2-135m --natural-lengths \
        --request-rates 1,2,4 --repeat 2 --json out.json

Requests are chat completions (streamed, greedy, `ignore_eos` so every request makes
--max-tokens tokens, unless --natural-lengths) sent with Poisson arrivals at --request-rate (inf = all at once) and at
most --max-concurrency in flight. Reported per backend: TTFT, TPOT, inter-token latency (ITL)
and end-to-end latency (mean, median, p99, in ms), request and output-token throughput, and
goodput (requests/s meeting every --goodput limit, e.g. ttft:2000 tpot:200 e2e:20000 in ms).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import energy_window, machine, median_run  # noqa: E402
from length_ceiling import arrival_times, ceiling  # noqa: E402
from helios.tuning.datasets import load_prompts  # noqa: E402


@dataclass
class RequestResult:
    ok: bool = False
    error: str = ""
    output_tokens: int = 0
    ttft: float = 0.0
    e2e: float = 0.0
    chunk_times: list[float] = field(default_factory=list)  # arrival time of each streamed piece

    @property
    def itls(self) -> list[float]:
        return [b - a for a, b in zip(self.chunk_times, self.chunk_times[1:])]

    @property
    def tpot(self) -> float | None:
        return (self.e2e - self.ttft) / (self.output_tokens - 1) if self.output_tokens > 1 else None


# a backend streams one request: it yields (number of new tokens, finished) and, at the end, nothing more
Backend = Callable[[str, int], AsyncIterator[int]]


def http_backend(base_url: str, model: str, ignore_eos: bool = True) -> tuple[Backend, Callable]:
    import httpx

    client = httpx.AsyncClient(base_url=base_url, timeout=None, limits=httpx.Limits(max_connections=None))

    async def stream(prompt: str, max_tokens: int) -> AsyncIterator[int]:
        body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
                "temperature": 0, "stream": True, "ignore_eos": ignore_eos, "stream_options": {"include_usage": True}}
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread())[:200]!r}")
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    yield -chunk["usage"]["completion_tokens"]  # the exact count, from the server
                elif chunk["choices"] and chunk["choices"][0]["delta"].get("content") is not None:
                    yield 1  # one chunk per engine step per request: one token

    return stream, client.aclose


def in_process_backend(engine, ignore_eos: bool = True, lengths: list | None = None) -> Backend:
    """The engine in this process; `lengths` collects (predicted, actual) output tokens per request."""
    from helios import SamplingParams

    async def stream(prompt: str, max_tokens: int) -> AsyncIterator[int]:
        params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=ignore_eos)
        async for out in engine.generate([{"role": "user", "content": prompt}], params):
            yield len(out.new_token_ids)
            if out.finished and lengths is not None:
                lengths.append((out.predicted_length, len(out.token_ids)))

    return stream


async def one_request(backend: Backend, prompt: str, max_tokens: int) -> RequestResult:
    result, start = RequestResult(), time.perf_counter()
    try:
        async for count in backend(prompt, max_tokens):
            now = time.perf_counter() - start
            if count < 0:
                result.output_tokens = -count
                continue
            if not result.chunk_times:
                result.ttft = now
            result.chunk_times.append(now)
            result.output_tokens += count
        result.e2e, result.ok = time.perf_counter() - start, True
    except Exception as exc:  # reported, counted as failed
        result.error = str(exc)
    return result


async def run_load(backend: Backend, prompts: list[str], max_tokens: int, rate: float,
                   max_concurrency: int | None, seed: int) -> tuple[list[RequestResult], float, float | None]:
    """Poisson arrivals at `rate` requests/s (inf: all at once), at most `max_concurrency` in flight.
    Returns the results, the seconds and the machine's joules meanwhile (None: no energy meter)."""
    gate = asyncio.Semaphore(max_concurrency) if max_concurrency else None

    async def limited(prompt: str) -> RequestResult:
        if gate is None:
            return await one_request(backend, prompt, max_tokens)
        async with gate:
            return await one_request(backend, prompt, max_tokens)

    with energy_window() as energy:
        tasks, start = [], time.perf_counter()
        for prompt, at in zip(prompts, arrival_times(len(prompts), rate, seed)):
            await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
            tasks.append(asyncio.create_task(limited(prompt)))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    return results, duration, energy.joules


def _stats(values: list[float]) -> dict:
    if not values:
        return {"mean_ms": None, "median_ms": None, "p99_ms": None}
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)]
    return {"mean_ms": 1000 * statistics.fmean(values), "median_ms": 1000 * statistics.median(values),
            "p99_ms": 1000 * p99}


def summarize(results: list[RequestResult], duration: float, slo_ms: dict[str, float],
              joules: float | None = None) -> dict:
    """The run's figures; energy only where the machine has a meter (`joules` None: absent, not 0)."""
    done = [r for r in results if r.ok]
    tokens = sum(r.output_tokens for r in done)

    def meets(r: RequestResult) -> bool:
        measured = {"ttft": r.ttft, "tpot": r.tpot or 0.0, "e2e": r.e2e}
        return all(measured[k] * 1000 <= limit for k, limit in slo_ms.items())

    return {
        "completed": len(done), "failed": len(results) - len(done),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
        "duration_s": duration, "output_tokens": tokens,
        "request_throughput": len(done) / duration, "output_throughput": tokens / duration,
        "goodput": sum(map(meets, done)) / duration if slo_ms else None,
        "ttft": _stats([r.ttft for r in done]), "tpot": _stats([r.tpot for r in done if r.tpot is not None]),
        "itl": _stats([gap for r in done for gap in r.itls]), "e2e": _stats([r.e2e for r in done]),
        "energy_joules": joules, "energy_per_token_j": joules / tokens if joules is not None and tokens else None,
    }


def print_summary(name: str, summary: dict) -> None:
    print(f"\n== {name}: {summary['completed']} ok, {summary['failed']} failed in {summary['duration_s']:.1f} s")
    print(f"   request throughput {summary['request_throughput']:.2f} req/s, "
          f"output {summary['output_throughput']:.1f} tok/s" +
          (f", goodput {summary['goodput']:.2f} req/s" if summary["goodput"] is not None else ""))
    if summary.get("energy_per_token_j") is not None:
        print(f"   energy {summary['energy_joules']:.1f} J, {summary['energy_per_token_j']:.3f} J per output token")
    for key in ("ttft", "tpot", "itl", "e2e"):
        s = summary[key]
        if s["mean_ms"] is not None:
            print(f"   {key:>4}: mean {s['mean_ms']:8.1f}  median {s['median_ms']:8.1f}  p99 {s['p99_ms']:8.1f} ms")
    for error in summary["errors"]:
        print(f"   error: {error}")


async def bench_http(args, prompts: list[str], slo: dict) -> dict:
    backend, close = http_backend(args.base_url, args.model, ignore_eos=not args.natural_lengths)
    try:
        await run_load(backend, prompts[:2], 4, math.inf, None, args.seed)  # warm-up
        results, duration, joules = await run_load(backend, prompts, args.max_tokens, args.request_rate,
                                                   args.max_concurrency, args.seed)
    finally:
        await close()
    return summarize(results, duration, slo, joules)


async def bench_in_process(args, prompts: list[str], slo: dict) -> dict:
    from helios import EngineConfig
    from helios.async_engine import AsyncLLMEngine

    engine = AsyncLLMEngine.from_config(EngineConfig(model=args.source, kv_cache_memory=args.kv_cache_memory,
                                                     max_num_seqs=args.max_num_seqs))
    backend = in_process_backend(engine, ignore_eos=not args.natural_lengths)
    try:
        await run_load(backend, prompts[:2], 4, math.inf, None, args.seed)  # warm-up
        results, duration, joules = await run_load(backend, prompts, args.max_tokens, args.request_rate,
                                                   args.max_concurrency, args.seed)
    finally:
        engine.shutdown()
    return summarize(results, duration, slo, joules)


def start_helios(args) -> None:
    """Helios on Ray Serve with one model replica using every local CPU (as `helios serve` does)."""
    from deployments import run
    from deployments.config import parse_config

    ingress = {} if args.niceness is None else {"niceness": args.niceness}
    config = parse_config({"http": {"host": "127.0.0.1", "port": args.port}, "ingress": ingress,
                           "models": [{"id": args.model, "source": args.source, "num_cpus": os.cpu_count(),
                                       "max_ongoing_requests": args.max_num_seqs,
                                       "stream_interval": args.stream_interval,
                                       "stream_chunks_per_step": args.stream_chunks_per_step,
                                       "engine": {"kv_cache_memory": args.kv_cache_memory,
                                                  "max_num_seqs": args.max_num_seqs}}]})
    args.base_url = run.start(config)


def compare_once(args, prompts: list[str], slo: dict) -> tuple[float, dict, dict]:
    """Helios over HTTP (Ray started and stopped around it), then the in-process engine
    with Ray down: (HTTP / in-process output throughput, both summaries)."""
    from deployments import run

    start_helios(args)
    try:
        http = asyncio.run(bench_http(args, prompts, slo))
    finally:
        run.stop()
    local = asyncio.run(bench_in_process(args, prompts, slo))
    return http["output_throughput"] / local["output_throughput"], http, local


def policy_engine(args, policy: str, true_lengths: dict[str, int] | None = None):
    """An engine scheduling by `policy`; "spf-oracle": spf whose every prediction is replaced
    by the answer's true length (`true_lengths`: prompt -> output tokens of a greedy run)."""
    from helios import EngineConfig
    from helios.async_engine import AsyncLLMEngine

    engine = AsyncLLMEngine.from_config(EngineConfig(
        model=args.source, kv_cache_memory=args.kv_cache_memory, max_num_seqs=args.max_num_seqs,
        length_head=args.length_head, scheduling_policy=policy.removesuffix("-oracle"), length_aging=args.length_aging))
    if policy.endswith("-oracle"):
        _replace_predictions(engine.engine, true_lengths)
    return engine


def _replace_predictions(engine, true_lengths: dict[str, int]) -> None:
    """Benchmarks only: the length head's prediction, made in prefill, is swapped for the truth."""
    make, update, truth = engine.make_sequence, engine.scheduler.update, {}

    def make_sequence(prompt, params=None, request_id=None):
        seq = make(prompt, params, request_id)
        truth[id(seq)] = true_lengths.get(prompt[-1]["content"])
        return seq

    def update_with_truth(batch, sampled, now):
        for item in sampled:
            if item.predicted_length is not None and truth.get(id(item.seq)) is not None:
                item.predicted_length = truth.pop(id(item.seq))
        return update(batch, sampled, now)

    engine.make_sequence, engine.scheduler.update = make_sequence, update_with_truth


async def greedy_lengths(engine, args, prompts: list[str]) -> dict[str, int]:
    """prompt -> output tokens of its greedy answer (all prompts at once, on `engine`)."""
    backend = in_process_backend(engine, ignore_eos=not args.natural_lengths)

    async def one(prompt: str) -> tuple[str, int]:
        count = 0
        async for delta in backend(prompt, args.max_tokens):
            count += delta
        return prompt, count

    return dict(await asyncio.gather(*(one(p) for p in prompts)))


async def one_policy_run(engine, args, prompts: list[str], rate: float, slo: dict) -> dict:
    """One load on one engine: the summary, plus preemptions and the predictions' errors."""
    lengths: list = []
    backend = in_process_backend(engine, ignore_eos=not args.natural_lengths, lengths=lengths)
    preempted = engine.engine.stats.preemptions
    results, duration, joules = await run_load(backend, prompts, args.max_tokens, rate, args.max_concurrency,
                                               args.seed)
    summary = summarize(results, duration, slo, joules)
    errors = [abs(p - a) for p, a in lengths if p is not None]
    summary.update(preemptions=engine.engine.stats.preemptions - preempted,
                   mean_output_tokens=statistics.fmean(a for _, a in lengths) if lengths else None,
                   prediction_mae=statistics.fmean(errors) if errors else None)
    return summary


async def compare_policies(args, prompts: list[str], slo: dict, save: Callable[[dict], None]) -> dict:
    """Each policy's engine built once; per rate, `repeat` rounds, the policies alternated (and
    their order swapped each round). The median round per (rate, policy) by mean E2E is reported;
    `save` gets the rows after each rate (a long run keeps what it measured)."""
    policies = args.compare_policies.split(",")
    engines = {policy: policy_engine(args, policy) for policy in policies if not policy.endswith("-oracle")}
    try:
        for engine in engines.values():  # warm-up
            await run_load(in_process_backend(engine), prompts[:2], 4, math.inf, None, args.seed)
        truth = None
        if any(policy.endswith("-oracle") for policy in policies):
            truth = await greedy_lengths(next(iter(engines.values())), args, prompts)
            engines.update({policy: policy_engine(args, policy, truth) for policy in policies if policy not in engines})
        rows = {}
        for rate in (float(r) for r in args.request_rates.split(",")):
            runs = {policy: [] for policy in policies}
            for round_index in range(args.repeat):
                order = policies if round_index % 2 == 0 else policies[::-1]
                for policy in order:
                    runs[policy].append(await one_policy_run(engines[policy], args, prompts, rate, slo))
                    summary = runs[policy][-1]
                    print_summary(f"{policy} at {rate}/s, round {round_index + 1}", summary)
                    print(f"   preemptions {summary['preemptions']}, mean output {summary['mean_output_tokens']} "
                          f"tokens, prediction MAE {summary['prediction_mae']}", flush=True)
            rows[str(rate)] = {policy: {"median": median_run(r, key=lambda s: s["e2e"]["mean_ms"]),
                                        "mean_e2e_ms_runs": [s["e2e"]["mean_ms"] for s in r]}
                               for policy, r in runs.items()}
            if truth is not None:  # what perfect shortest-remaining-first could give on these requests
                step_s = rows[str(rate)][policies[0]]["median"]["itl"]["median_ms"] / 1000
                rows[str(rate)]["ceiling"] = ceiling([truth[p] for p in prompts], arrival_times(
                    len(prompts), rate, args.seed), args.max_num_seqs, step_s)
                print(f"   ceiling (slot model, true lengths): mean E2E {rows[str(rate)]['ceiling']['mean_speedup']:.2f}x "
                      f"lower under shortest-remaining-first than FCFS", flush=True)
            save(rows)
        return rows
    finally:
        for engine in engines.values():
            engine.shutdown()


def policy_ratios(rows: dict, baseline: str, other: str) -> dict:
    """Per rate: baseline / other mean E2E (above 1: `other` is faster), other / baseline p99 E2E,
    TTFT and throughput."""
    ratios = {}
    for rate, row in rows.items():
        base, new = row[baseline]["median"], row[other]["median"]
        ratios[rate] = {"mean_e2e_speedup": base["e2e"]["mean_ms"] / new["e2e"]["mean_ms"],
                        "p99_e2e_ratio": new["e2e"]["p99_ms"] / base["e2e"]["p99_ms"],
                        "mean_ttft_speedup": base["ttft"]["mean_ms"] / new["ttft"]["mean_ms"],
                        "throughput_ratio": new["output_throughput"] / base["output_throughput"]}
    return ratios


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", default="smollm2-135m", help="the model name sent in requests")
    parser.add_argument("--source", default="smollm2-135m", help="what Helios loads (--compare-in-process)")
    parser.add_argument("--dataset", default=None, help="Alpaca JSON, JSONL or ShareGPT (default: shared roleplay set)")
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--request-rate", type=float, default=math.inf, help="requests/s, Poisson (default inf)")
    parser.add_argument("--max-concurrency", type=int, default=None)
    parser.add_argument("--goodput", nargs="*", default=[], help="SLO limits in ms: ttft:MS tpot:MS e2e:MS")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compare-in-process", action="store_true",
                        help="start Helios on Ray Serve, measure over HTTP, stop it, then measure the "
                             "in-process engine on the same prompts and report the ratio")
    parser.add_argument("--repeat", type=int, default=1,
                        help="--compare-in-process pairs to run; the median pair is reported, every ratio listed")
    parser.add_argument("--port", type=int, default=8000, help="port for --compare-in-process")
    parser.add_argument("--kv-cache-memory", type=int, default=512 << 20)
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--stream-interval", type=int, default=1, help="tokens per streamed chunk (Helios server)")
    parser.add_argument("--stream-chunks-per-step", type=int, default=8,
                        help="stream_chunks_per_step of the Helios server (0: chunks never grow under load)")
    parser.add_argument("--niceness", type=int, default=None, help="ingress.niceness of the Helios server "
                                                                   "(default: the serving config's)")
    parser.add_argument("--natural-lengths", action="store_true",
                        help="answers end where the model ends them (no ignore_eos), up to --max-tokens")
    parser.add_argument("--compare-policies", default=None,
                        help="in-process, e.g. fcfs,spf,spf-oracle: one engine per scheduling policy, alternated "
                             "per rate (spf-oracle: spf told each answer's true length, from a greedy run first)")
    parser.add_argument("--request-rates", default="1,2,4", help="--compare-policies: requests/s, comma-separated")
    parser.add_argument("--length-head", default=None, help="--compare-policies: the engines' length head")
    parser.add_argument("--length-aging", type=float, default=20.0, help="--compare-policies: spf's length_aging")
    parser.add_argument("--json", default=None, help="write the results here")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    slo = {k: float(v) for k, v in (item.split(":") for item in args.goodput)}
    if set(slo) - {"ttft", "tpot", "e2e"}:
        raise SystemExit("--goodput takes ttft:MS tpot:MS e2e:MS")
    prompts = load_prompts(args.dataset, args.num_prompts)
    report = {"command": "python " + " ".join(sys.argv), "machine": machine(), "dataset": args.dataset or "default",
              "num_prompts": len(prompts), "max_tokens": args.max_tokens, "request_rate": args.request_rate,
              "max_concurrency": args.max_concurrency, "slo_ms": slo, "results": {}}
    if args.compare_policies:
        report.update(machine_load=os.getloadavg(), natural_lengths=args.natural_lengths,
                      length_head=args.length_head, length_aging=args.length_aging, max_num_seqs=args.max_num_seqs)
        first, *others = args.compare_policies.split(",")

        def save(rows: dict) -> None:
            report.update(policies=rows, machine_load_after=os.getloadavg(),
                          ratios={other: policy_ratios(rows, first, other) for other in others})
            if args.json:
                Path(args.json).write_text(json.dumps(report, indent=2, default=str))

        asyncio.run(compare_policies(args, prompts, slo, save))
        print(json.dumps(report["ratios"], indent=2))
    elif args.compare_in_process:
        pairs = [compare_once(args, prompts, slo) for _ in range(args.repeat)]
        ratio, http, local = median_run(pairs, key=lambda pair: pair[0])
        report["results"] = {"helios-http": http, "helios-in-process": local}
        report["http_over_in_process"] = ratio
        report["ratio_runs"] = [pair[0] for pair in pairs]
    else:
        report["results"]["endpoint"] = asyncio.run(bench_http(args, prompts, slo))
    for name, summary in report["results"].items():
        print_summary(name, summary)
    if "http_over_in_process" in report:
        print(f"\nHTTP keeps {report['http_over_in_process']:.2f} of the in-process output throughput "
              f"(median of {', '.join(f'{r:.2f}' for r in report['ratio_runs'])})")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
