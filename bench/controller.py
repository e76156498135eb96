"""Adaptive (the HELIOS controller) vs each static full-depth candidate, in one process.

    OMP_NUM_THREADS=1 nice -n 10 python bench/controller.py --rounds 2 --json bench/results/controller.json

A workload of three phases (chat, then GSM8K, then summarisation, from ../shared/data), sent by
a closed loop of --concurrency clients, greedy, at most --max-tokens tokens each. Per round,
in alternating order: the controller with a throughput objective, with a latency objective,
and each candidate statically at its full depth. A decision loads the new candidate or depth
in the background while the old engine serves, then hands the requests still waiting on the old
engine to the new one and drains the rest there (bench/controller_loop.py). `--drain-ablation`
adds, per objective, the controller without that hand-off (`adaptive-OBJECTIVE-drain`: every
request admitted by the old engine finishes there), to measure what the hand-off gives.
Per run: output tokens/s, mean/p95 response time and TTFT, the quality proxy (word agreement
with the reference candidate's replies to the same requests, as `helios profile` measures
reference_agreement), GSM8K accuracy on the GSM8K phase, decisions with reasons, swaps, failed
requests; then the ratios adaptive / best static choice that meets the SLO's quality floor.

Two modes, both by default: `real` (bench/configs/controller-slo.yaml: smollm2 with its tuned
exits at several depths, smollm2 without exits, qwen2.5-coder-0.5b) and `ceiling`
(bench/configs/controller-ceiling-slo.yaml: synthetic exits that pay, drawn per phase from
--ceiling-phases, as bench/offline.py --exit-profile does): what the mechanism gives when
exits pay. Each mode needs its model repository (`helios profile SLO`).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

ROOT, BENCH = Path(__file__).resolve().parent.parent, Path(__file__).resolve().parent
if __name__ == "controller":
    # Imported as `controller` because bench/ was ahead of the checkout on sys.path (some tests
    # put it there): this file would shadow the controller package, so install the package under
    # that name instead (the importer receives sys.modules["controller"]).
    _spec = importlib.util.spec_from_file_location("controller", ROOT / "controller" / "__init__.py",
                                                   submodule_search_locations=[str(ROOT / "controller")])
    _package = importlib.util.module_from_spec(_spec)
    sys.modules["controller"] = _package
    _spec.loader.exec_module(_package)
# the checkout first (its controller package), bench/ last (common, controller_loop)
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != BENCH] + [str(BENCH)]

from common import machine  # noqa: E402
from controller.quality import token_agreement  # noqa: E402
from controller.repository import Repository, load_repository  # noqa: E402
from controller.selector import allowed_depths, evaluate  # noqa: E402
from controller.slo import SLOConfig, load_slo  # noqa: E402
from controller_loop import Adaptive, Replica, Request, ServeLoop, engine_config, summarize  # noqa: E402
from helios import LLMEngine, SamplingParams  # noqa: E402
from helios.tuning.datasets import SHARED_DATA, load_prompts  # noqa: E402

CONFIGS = Path(__file__).resolve().parent / "configs"
DEFAULT_PHASES = "chat=8:0.2,14:0.65,30:0.15;gsm8k=8:0.1,14:0.3,30:0.6;summary=8:0.2,14:0.65,30:0.15"


# ---- workload --------------------------------------------------------------------------

def load_workload(chat: str, gsm8k: str, summary: str, per_phase: int, offset: int) -> list[Request]:
    """Chat, then GSM8K (with answers), then summarisation; `offset` skips what profiling used."""
    chats = load_prompts(chat)[offset:offset + per_phase]
    maths = json.loads(Path(gsm8k).read_text())[offset:offset + per_phase]
    articles = load_prompts(summary)[offset:offset + per_phase]
    texts = [("chat", t, None) for t in chats] + [("gsm8k", r["instruction"], r["output"]) for r in maths]
    texts += [("summary", t, None) for t in articles]
    return [Request(i, phase, prompt, answer) for i, (phase, prompt, answer) in enumerate(texts)]


def parse_phases(text: str) -> dict[str, dict[int, float]]:
    """'chat=8:0.2,30:0.8;gsm8k=...' -> {phase: {layer: share}}."""
    phases = {}
    for part in filter(None, text.split(";")):
        name, profile = part.split("=")
        phases[name.strip()] = {int(l): float(s) for l, s in (pair.split(":") for pair in profile.split(","))}
    return phases


# ---- engines ---------------------------------------------------------------------------

def warm(engine: LLMEngine) -> LLMEngine:
    """One short request: first-call costs out of the timings (a new replica is warm before traffic)."""
    engine.add_request("Hello", SamplingParams(max_tokens=2, temperature=0), "warm-up")
    while engine.has_unfinished():
        engine.step()
    return engine


class Engines:
    """Loads engines for a mode. Static runs and each adaptive run's first choice reuse a loaded
    engine (loaded once, before any timing, as a deployed replica is); a decision's new choice
    is always a fresh load, paid inside the adaptive run."""

    def __init__(self, slo: SLOConfig, repository: Repository, log=print):
        self.slo, self.repository, self.log = slo, repository, log
        self.cache: dict[tuple[str, int], LLMEngine] = {}
        self.load_seconds: dict[str, float] = {}

    def fresh(self, candidate: str, depth: int) -> LLMEngine:
        started = time.perf_counter()
        engine = warm(LLMEngine(engine_config(self.slo, self.repository, candidate, depth)))
        self.load_seconds[f"{candidate}@{depth}"] = time.perf_counter() - started
        return engine

    def cached(self, candidate: str, depth: int) -> LLMEngine:
        if (candidate, depth) not in self.cache:
            self.log(f"loading {candidate}@{depth} (untimed: a static replica is up before traffic)")
            self.cache[(candidate, depth)] = self.fresh(candidate, depth)
        return self.cache[(candidate, depth)]


# ---- runs ------------------------------------------------------------------------------

def full_depth(slo: SLOConfig, repository: Repository, candidate: str) -> int:
    return max(allowed_depths(slo, repository, candidate))


DRAIN = "-drain"  # an adaptive run whose replaced engine hands nothing on


def systems(slo: SLOConfig, repository: Repository, objectives: list[str],
            drain_ablation: bool = False) -> list[tuple[str, str, str | None]]:
    """(run name, objective or 'static', candidate for static runs)."""
    runs = [(f"adaptive-{o}{suffix}", o, None) for o in objectives
            for suffix in ([""] + [DRAIN] * drain_ablation)]
    return runs + [(f"static-{c.id}@{full_depth(slo, repository, c.id)}", "static", c.id)
                   for c in slo.candidates if c.id in repository.candidates]


def run_one(name: str, objective: str, candidate: str | None, engines: Engines, workload: list[Request],
            args, phase_profiles, run_id: str) -> dict:
    slo, repository = engines.slo, engines.repository
    adaptive = None
    if candidate is None:
        adaptive = Adaptive(slo.model_copy(update={"objective": objective}), repository)
        candidate, depth = adaptive.choice
    else:
        depth = full_depth(slo, repository, candidate)
    replica = Replica(engines.cached(candidate, depth), f"{candidate}@{depth}")
    loop = ServeLoop(workload, args.concurrency, args.max_tokens, engines.fresh, adaptive, phase_profiles,
                     progress=print, progress_every=args.progress_every, run_id=run_id,
                     handoff=not name.endswith(DRAIN))
    print(f"run {run_id}: {name}, starting on {replica.name}", flush=True)
    result = loop.run(replica)
    row = {"system": name, "objective": objective, **summarize(result, workload)}
    row["texts"] = {r.request.index: r.text for r in result.records}
    print(f"run {run_id}: {name}: {row['tokens_per_s']:.1f} tok/s, mean response {row['mean_response_s']:.2f} s, "
          f"failed {row['failed']}, swaps {len(row['swaps'])}", flush=True)
    return row


def add_quality(rounds: list[list[dict]], reference: str, workload: list[Request]) -> None:
    """Word agreement of each run's replies with the reference candidate's first static run
    (words, so candidates with different tokenizers compare, as `helios profile` does)."""
    ref_run = next(r for rs in rounds for r in rs if r["objective"] == "static" and r["system"].startswith(
        f"static-{reference}@"))
    indices = [q.index for q in workload]
    ref_words = [ref_run["texts"].get(i, "").split() for i in indices]
    for runs in rounds:
        for run in runs:
            words = [run["texts"].get(i, "").split() for i in indices]
            run["quality"] = token_agreement(words, ref_words)
            run["quality_by_phase"] = {
                phase: token_agreement([w for w, q in zip(words, workload) if q.phase == phase],
                                       [w for w, q in zip(ref_words, workload) if q.phase == phase])
                for phase in dict.fromkeys(q.phase for q in workload)}


def meets_quality(slo: SLOConfig, run: dict) -> bool:
    figure = run["gsm8k_accuracy"] if slo.constraints.quality_proxy == "task_accuracy" else run["quality"]
    return figure is not None and figure >= slo.constraints.min_quality


def ratios(slo: SLOConfig, rounds: list[list[dict]], objectives: list[str]) -> dict:
    """Per round: adaptive vs the best static run of the same round that meets the quality floor."""
    out = {}
    for objective in objectives:
        per_round = []
        for runs in rounds:
            statics = [r for r in runs if r["objective"] == "static" and meets_quality(slo, r)]
            adaptive = next(r for r in runs if r["system"] == f"adaptive-{objective}")
            if not statics:
                continue
            if objective == "latency":
                best = min(statics, key=lambda r: r["mean_response_s"])
                ratio = best["mean_response_s"] / adaptive["mean_response_s"]  # > 1: adaptive answers sooner
            else:
                best = max(statics, key=lambda r: r["tokens_per_s"])
                ratio = adaptive["tokens_per_s"] / best["tokens_per_s"]
            row = {"ratio": ratio, "best_static": best["system"], "adaptive_meets_quality": meets_quality(slo, adaptive)}
            drained = next((r for r in runs if r["system"] == f"adaptive-{objective}{DRAIN}"), None)
            if drained is not None:  # the same ratio without the hand-off
                row["ratio_drain"] = (best["mean_response_s"] / drained["mean_response_s"] if objective == "latency"
                                      else drained["tokens_per_s"] / best["tokens_per_s"])
            per_round.append(row)
        values = [p["ratio"] for p in per_round]
        out[objective] = {"median": statistics.median(values) if values else None, "rounds": per_round,
                          "goal": 1.48 if objective == "throughput" else 1.39 if objective == "latency" else None}
        drained = [p["ratio_drain"] for p in per_round if "ratio_drain" in p]
        if drained:
            out[objective]["median_drain"] = statistics.median(drained)
    return out


def repository_summary(slo: SLOConfig, repository: Repository) -> list[dict]:
    """Each (candidate, depth) as the controller estimates it: the measured reason for its choices."""
    rows = []
    for objective in ("throughput", "latency"):
        scoped = slo.model_copy(update={"objective": objective})
        for c in slo.candidates:
            for depth in allowed_depths(slo, repository, c.id):
                e = evaluate(scoped, repository, c.id, depth)
                profile = repository.candidates[c.id].depths[depth]
                rows.append({"objective": objective, "candidate": c.id, "depth": depth,
                             "objective_value": e.objective_value, "agreement": profile.agreement,
                             "reference_agreement": profile.reference_agreement,
                             "task_accuracy": profile.task_accuracy, "breach_share": profile.breach_share,
                             "expected_breaches": e.expected_breaches, "sequences": e.sequences,
                             "violations": list(e.violations)})
    return rows


def bench_mode(mode: str, slo_path: str, args, phase_profiles, save=lambda report: None) -> dict:
    """Every round of one mode; `save` gets the report so far after each round (a long run on a
    busy machine keeps what it measured)."""
    slo = load_slo(slo_path)
    repository = load_repository(slo.repository)
    engines = Engines(slo, repository)
    per_phase = args.ceiling_per_phase if mode == "ceiling" and args.ceiling_per_phase else args.per_phase
    workload = load_workload(args.chat_dataset, args.gsm8k_dataset, args.summary_dataset, per_phase, args.offset)
    plan = systems(slo, repository, args.objectives, args.drain_ablation)
    reference = args.reference.get(mode) or repository.reference or slo.candidates[0].id
    rounds, report = [], {}
    for round_index in range(args.rounds):
        # --once: slow candidates run statically in the first round only (their replies are the quality reference)
        planned = [p for p in plan if round_index == 0 or p[2] not in args.once]
        order = planned if round_index % 2 == 0 else planned[::-1]  # alternate: the machine drifts
        runs = [run_one(name, objective, candidate, engines, workload, args, phase_profiles,
                        f"{mode}{round_index}-{i}") for i, (name, objective, candidate) in enumerate(order)]
        rounds.append(sorted(runs, key=lambda r: [p[0] for p in plan].index(r["system"])))
        add_quality(rounds, reference, workload)
        report = {"slo": slo_path, "repository": slo.repository, "reference": reference,
                  "quality_proxy": slo.constraints.quality_proxy, "min_quality": slo.constraints.min_quality,
                  "per_phase": per_phase, "phase_profiles": phase_profiles, "load_seconds": engines.load_seconds,
                  "repository_summary": repository_summary(slo, repository),
                  "rounds": [[{k: v for k, v in run.items() if k != "texts"} for run in runs] for runs in rounds],
                  "ratios": ratios(slo, rounds, args.objectives)}
        save(report)
    return report


def _f(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def print_mode(mode: str, report: dict) -> None:
    print(f"\n== {mode}: reference {report['reference']}, {report['quality_proxy']} >= {report['min_quality']}")
    print("system | tok/s | mean resp s | p95 resp s | mean TTFT s | quality | GSM8K acc | failed | swaps")
    for i, runs in enumerate(report["rounds"]):
        for r in runs:
            print(f"r{i} {r['system']} | {r['tokens_per_s']:.1f} | {_f(r['mean_response_s'])} | "
                  f"{_f(r['p95_response_s'])} | {_f(r['mean_ttft_s'])} | {_f(r['quality'], 3)} | "
                  f"{_f(r['gsm8k_accuracy'], 3)} | {r['failed']} | {len(r['swaps'])}")
    for objective, ratio in report["ratios"].items():
        print(f"{objective}: adaptive / best static = {ratio['median']} "
              f"({[round(p['ratio'], 3) for p in ratio['rounds']]}; goal {ratio['goal']})"
              + (f"; without the hand-off {ratio['median_drain']:.3f}" if "median_drain" in ratio else ""))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", default="real,ceiling", help="real, ceiling or both (comma-separated)")
    parser.add_argument("--slo", default=str(CONFIGS / "controller-slo.yaml"))
    parser.add_argument("--ceiling-slo", default=str(CONFIGS / "controller-ceiling-slo.yaml"))
    parser.add_argument("--ceiling-phases", default=DEFAULT_PHASES,
                        help="synthetic exit profile per phase: PHASE=LAYER:SHARE,...;PHASE=...")
    parser.add_argument("--chat-dataset", default=str(SHARED_DATA / "gpteacher_roleplay.json"))
    parser.add_argument("--gsm8k-dataset", default=str(SHARED_DATA / "gsm8k_train.json"))
    parser.add_argument("--summary-dataset", default=str(SHARED_DATA / "cnn_dailymail_summary.jsonl"))
    parser.add_argument("--per-phase", type=int, default=16, help="requests per phase")
    parser.add_argument("--ceiling-per-phase", type=int, default=None, help="requests per phase, ceiling mode")
    parser.add_argument("--offset", type=int, default=100, help="skip the records profiling used")
    parser.add_argument("--concurrency", type=int, default=8, help="closed-loop clients")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--objectives", default="throughput,latency")
    parser.add_argument("--reference", default="ceiling=smollm2-full",
                        help="quality reference per mode (MODE=CANDIDATE,...; default: the repository's)")
    parser.add_argument("--once", default="", help="candidates whose static run is in the first round only "
                                                  "(comma-separated; for slow ones on a busy machine)")
    parser.add_argument("--drain-ablation", action="store_true",
                        help="also run each objective's controller without handing waiting requests on")
    parser.add_argument("--progress-every", type=int, default=8)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    args.objectives = args.objectives.split(",")
    args.once = [c for c in args.once.split(",") if c]
    args.reference = dict(p.split("=") for p in args.reference.split(",") if p)
    return args


def main() -> None:
    import os

    import torch

    args = parse_args()
    torch.manual_seed(0)
    started = time.time()
    report = {"command": "python " + " ".join(sys.argv), "machine": machine(),
              "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "torch_threads": torch.get_num_threads(),
              "arrivals": f"closed loop of {args.concurrency} clients", "per_phase": args.per_phase,
              "max_tokens": args.max_tokens, "rounds": args.rounds, "offset": args.offset,
              "static_first_round_only": args.once}
    for mode in args.modes.split(","):
        slo_path = args.slo if mode == "real" else args.ceiling_slo
        phases = parse_phases(args.ceiling_phases) if mode == "ceiling" else {}

        def save(partial: dict, mode: str = mode) -> None:  # after each round
            report[mode] = partial
            report["wall_seconds"] = time.time() - started
            if args.json:
                Path(args.json).parent.mkdir(parents=True, exist_ok=True)
                Path(args.json).write_text(json.dumps(report, indent=2, default=str) + "\n")

        print_mode(mode, bench_mode(mode, slo_path, args, phases, save))


if __name__ == "__main__":
    main()
