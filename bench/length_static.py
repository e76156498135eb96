"""Static micro-batch mode: the Sequence Scheduling pipeline (Zheng et al. 2023) and its ablation.

A pool of prompts is served in static batches (each batch runs to its end before the next
starts), in four ways, alternated round by round:

- vanilla: pool order, `batch_size` per batch, every request up to the cap;
- predictor: the pool sorted by predicted length, then batches as vanilla (grouping only);
- vbs_fcr: sorted; variable batch size (VBS): a batch takes requests while
  size x (its largest prediction) <= `token_budget`, at most `max_batch`; each batch stops
  at ceil(largest prediction x (1 + slack)) tokens; requests that outrun it are failures,
  collected and recomputed at the end, up to the cap, in VBS batches (FCR). The
  recomputation share is bounded: once more than `max_fcr_share` of the requests done so
  far failed, later batches run to the cap (nothing more fails). No request is lost: a
  recomputed one runs from scratch, greedy, so its output is the unscheduled one;
- oracle: vbs_fcr with the true (vanilla) lengths as predictions: the ceiling.

Predictions come from the engine's length head in a prefill pass (max_tokens=1) over the
pool, timed and counted in the predictor rows (the perception cost).

    nice -n 19 python bench/length_static.py --out bench/results/length_static.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from helios import SamplingParams  # noqa: E402


@dataclass
class StaticResult:
    outputs: dict[int, list[int]] = field(default_factory=dict)  # pool index -> token ids
    batch_sizes: list[int] = field(default_factory=list)
    recomputed: list[int] = field(default_factory=list)
    seconds: float = 0.0


def fixed_batches(order: list[int], batch_size: int) -> list[list[int]]:
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def vbs_batches(order: list[int], lengths: list[int], token_budget: int, max_batch: int) -> list[list[int]]:
    """Consecutive groups of `order` (shortest first): a group grows while size x its largest
    length stays within `token_budget`, at most `max_batch`, at least one request."""
    batches, current, longest = [], [], 0
    for i in order:
        grown = max(longest, lengths[i], 1)
        if current and (len(current) >= max_batch or (len(current) + 1) * grown > token_budget):
            batches.append(current)
            current, grown = [], max(lengths[i], 1)
        current.append(i)
        longest = grown
    return batches + ([current] if current else [])


def run_batch(engine, prompts: list, indices: list[int], limit: int) -> dict[int, tuple[list[int], str]]:
    """One static batch to its end: {pool index: (token ids, finish reason)}."""
    params = SamplingParams(max_tokens=limit, temperature=0)
    for i in indices:
        engine.add_request(prompts[i], params, f"b{i}")
    done = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                done[int(out.request_id[1:])] = (out.token_ids, out.finish_reason)
    return done


def predict_pool(engine, prompts: list) -> tuple[list[int], float]:
    """The length head's prediction for each prompt (a prefill pass), and its seconds."""
    started = time.perf_counter()
    done = {}
    for i, p in enumerate(prompts):
        engine.add_request(p, SamplingParams(max_tokens=1, temperature=0), f"p{i}")
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                done[int(out.request_id[1:])] = out.predicted_length
    if any(v is None for v in done.values()):
        raise ValueError("the engine has no length head: pass --length-head")
    return [done[i] for i in range(len(prompts))], time.perf_counter() - started


def serve_fixed(engine, prompts: list, order: list[int], batch_size: int, cap: int) -> StaticResult:
    result, started = StaticResult(), time.perf_counter()
    for batch in fixed_batches(order, batch_size):
        result.batch_sizes.append(len(batch))
        result.outputs.update({i: ids for i, (ids, _) in run_batch(engine, prompts, batch, cap).items()})
    result.seconds = time.perf_counter() - started
    return result


def serve_vbs_fcr(engine, prompts: list, predicted: list[int], cap: int, token_budget: int, max_batch: int,
                  slack: float = 0.0, max_fcr_share: float = 0.2) -> StaticResult:
    result, started = StaticResult(), time.perf_counter()
    order = sorted(range(len(prompts)), key=lambda i: predicted[i])
    failed: list[int] = []
    for batch in vbs_batches(order, predicted, token_budget, max_batch):
        result.batch_sizes.append(len(batch))
        over_budget = len(failed) > max_fcr_share * max(1, len(result.outputs) + len(failed))
        limit = cap if over_budget else min(cap, math.ceil(max(predicted[i] for i in batch) * (1 + slack)))
        for i, (ids, reason) in run_batch(engine, prompts, batch, limit).items():
            if reason == "length" and limit < cap:
                failed.append(i)  # outran its group: collected, recomputed from scratch later
            else:
                result.outputs[i] = ids
    capped = [cap] * len(prompts)  # recomputation: up to the cap, VBS on the cap
    for batch in vbs_batches(failed, capped, token_budget, max_batch):
        result.batch_sizes.append(len(batch))
        result.outputs.update({i: ids for i, (ids, _) in run_batch(engine, prompts, batch, cap).items()})
    result.recomputed = failed
    result.seconds = time.perf_counter() - started
    return result


def main() -> None:
    from helios import LLM
    from helios.tuning.datasets import load_prompts
    from common import machine, median_run

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--length-head", default="smollm2-135m")
    parser.add_argument("--dataset", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"
                                                 / "self_instruct_seed_tasks.jsonl"))
    parser.add_argument("--skip", type=int, default=60, help="pool starts after these prompts (length-tune's held-out)")
    parser.add_argument("--pool", type=int, default=48)
    parser.add_argument("--cap", type=int, default=128, help="max_tokens of every request")
    parser.add_argument("--batch-size", type=int, default=8, help="vanilla and predictor batch size")
    parser.add_argument("--max-batch", type=int, default=32, help="VBS: largest batch")
    parser.add_argument("--token-budget", type=int, default=None,
                        help="VBS: batch size x longest prediction at most (default: batch-size x cap, vanilla's worst case)")
    parser.add_argument("--slack", type=float, default=0.0)
    parser.add_argument("--max-fcr-share", type=float, default=0.2)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--dtype", default="auto", help="auto: as the engine picks (float32 on CPUs without bf16 matmuls)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    args.token_budget = args.token_budget or args.batch_size * args.cap

    llm = LLM(args.model, length_head=args.length_head, dtype=args.dtype, kv_cache_memory=512 << 20,
              max_num_seqs=max(args.max_batch, args.batch_size))
    engine = llm.engine
    texts = load_prompts(args.dataset)[args.skip:args.skip + args.pool]
    prompts = [[{"role": "user", "content": t}] for t in texts]
    rows: dict[str, list[dict]] = {k: [] for k in ("vanilla", "predictor", "vbs_fcr", "oracle")}
    for _ in range(args.rounds):
        vanilla = serve_fixed(engine, prompts, list(range(len(prompts))), args.batch_size, args.cap)
        true_lengths = [len(vanilla.outputs[i]) for i in range(len(prompts))]
        predicted, perceive_s = predict_pool(engine, prompts)
        predicted = [min(p, args.cap) for p in predicted]  # the head's cap may exceed this run's
        ordered = sorted(range(len(prompts)), key=lambda i: predicted[i])
        grouped = serve_fixed(engine, prompts, ordered, args.batch_size, args.cap)
        vbs = serve_vbs_fcr(engine, prompts, predicted, args.cap, args.token_budget, args.max_batch, args.slack,
                            args.max_fcr_share)
        oracle = serve_vbs_fcr(engine, prompts, true_lengths, args.cap, args.token_budget, args.max_batch)
        for name, res, extra_s in (("vanilla", vanilla, 0.0), ("predictor", grouped, perceive_s),
                                   ("vbs_fcr", vbs, perceive_s), ("oracle", oracle, 0.0)):
            same = sum(res.outputs[i] == vanilla.outputs[i] for i in range(len(prompts)))
            rows[name].append({"seconds": res.seconds + extra_s, "perception_s": extra_s,
                               "samples_per_s": len(prompts) / (res.seconds + extra_s),
                               "samples_per_s_without_perception": len(prompts) / res.seconds,
                               "batch_sizes": res.batch_sizes, "fcr_rate": len(res.recomputed) / len(prompts),
                               "same_output_as_vanilla": same})
        errors = [abs(p - t) for p, t in zip(predicted, true_lengths)]
        rows.setdefault("prediction", []).append({"mae": sum(errors) / len(errors),
                                                  "within_50": sum(e <= 50 for e in errors) / len(errors),
                                                  "true_lengths": true_lengths, "predicted": predicted})
    base = median_run(rows["vanilla"], key=lambda r: r["samples_per_s"])["samples_per_s"]
    summary = {}
    for name, runs in rows.items():
        if name == "prediction":
            continue
        row = median_run(runs, key=lambda r: r["samples_per_s"])
        summary[name] = {"samples_per_s": row["samples_per_s"], "speedup_vs_vanilla": row["samples_per_s"] / base,
                         "speedup_without_perception": row["samples_per_s_without_perception"] / base,
                         "fcr_rate": row["fcr_rate"]}
    report = {"command": "python " + " ".join(sys.argv), "machine": machine(), "args": vars(args),
              "summary": summary, "runs": rows}
    Path(args.out).write_text(json.dumps(report, indent=2))
    for name, row in summary.items():
        print(f"{name:10s} {row['samples_per_s']:.3f} samples/s  x{row['speedup_vs_vanilla']:.2f} "
              f"(x{row['speedup_without_perception']:.2f} without the perception pass), FCR {row['fcr_rate']:.2f}")


if __name__ == "__main__":
    main()
