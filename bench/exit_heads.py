"""Tuned exit heads: decode throughput vs token agreement, side by side with full depth.

    python bench/exit_heads.py --json bench/results/exit_heads.json --plot bench/results/exit_heads.png

Held-out prompts (default: the shared self-instruct set, the one `helios ee-tune` holds
out; prompts from its end, which tuning never saw), chat template, greedy. One model load
per batch size; each run switches the policy and the calibrated thresholds of the same
engine; full depth runs before and after them (the ratio is to the mean of the two). Reported per (batch size, policy, target): decode tokens/s (steps that hold only
decodes: exits act there) and its ratio to full depth in the same run, the mean exit layer,
token agreement with full depth on the same prefix (each generated token checked against
the full model's greedy token after the same tokens) and position-by-position agreement
with the full-depth output (stricter: one different token shifts the rest).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine  # noqa: E402
from offline import agreement, time_decode_steps  # noqa: E402

from helios import LLM, SamplingParams  # noqa: E402
from helios.tuning.datasets import SHARED_DATA, as_requests, load_prompts  # noqa: E402
from helios.tuning.distill import same_prefix_agreement  # noqa: E402
from helios.exits import SHIPPED_HEADS, apply_calibration  # noqa: E402

SHIPPED = SHIPPED_HEADS / "smollm2-135m"


def configure(llm: LLM, heads: dict, heads_meta: dict, policy: str, target: float | None) -> None:
    """Switch the engine's exit policy and calibrated thresholds in place (one model load per batch size)."""
    runner = llm.engine.runner
    runner.policy = policy
    runner.heads = {} if policy == "none" else dict(heads)
    if target is not None:
        apply_calibration(sorted(runner.heads.values(), key=lambda h: h.layer), heads_meta, target)


def run(llm: LLM, prompts: list, max_tokens: int) -> dict:
    decode = time_decode_steps(llm)
    started = time.perf_counter()
    outputs = llm.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0))
    return {"seconds": time.perf_counter() - started, "outputs": outputs,
            "decode_tokens_per_s": decode["tokens"] / max(decode["seconds"], 1e-9),
            "mean_exit_layer": statistics.fmean(l for o in outputs for l in o.exit_layers)}


def bench_batch(args, texts: list[str], batch: int, meta: dict) -> list[dict]:
    """Full depth before and after the exit runs: the machine drifts, so each ratio is to their mean."""
    llm = LLM(args.model, exit_heads=args.heads, exit_policy="token", max_num_seqs=batch,
              kv_cache_memory=args.kv_cache_memory, dtype=args.dtype)
    heads = dict(llm.engine.runner.heads)
    configure(llm, heads, meta, "none", None)
    prompts = as_requests(texts, llm.tokenizer)
    run(llm, prompts[:2], 8)  # warm-up
    full_before = run(llm, prompts, args.max_tokens)
    reference = [o.token_ids for o in full_before["outputs"]]
    rows = []
    for policy in ("token", "batch"):
        for target in args.targets:
            configure(llm, heads, meta, policy, target)
            result = run(llm, prompts, args.max_tokens)
            rows.append({"batch": batch, "policy": policy, "target": target,
                         "decode_tokens_per_s": result["decode_tokens_per_s"],
                         "mean_exit_layer": result["mean_exit_layer"],
                         "same_prefix_agreement": same_prefix_agreement(llm.engine.model, result["outputs"]),
                         "sequence_agreement": agreement([o.token_ids for o in result["outputs"]], reference)})
            print(json.dumps(rows[-1]), flush=True)
    configure(llm, heads, meta, "none", None)
    full_after = run(llm, prompts, args.max_tokens)
    full_tps = statistics.fmean([full_before["decode_tokens_per_s"], full_after["decode_tokens_per_s"]])
    for row in rows:
        row["speedup"] = row["decode_tokens_per_s"] / full_tps
    full = {"batch": batch, "policy": "full", "target": None, "decode_tokens_per_s": full_tps, "speedup": 1.0,
            "full_before_after": [full_before["decode_tokens_per_s"], full_after["decode_tokens_per_s"]],
            "mean_exit_layer": full_before["mean_exit_layer"], "same_prefix_agreement": 1.0,
            "sequence_agreement": 1.0}
    return [full] + rows


def teacher_forced(args, texts: list[str], meta: dict) -> dict:
    """On these prompts' full-depth continuations: what the calibrated thresholds do per token, and
    the oracle bound (each token at the first exit whose head agrees: what better confidence could win)."""
    from helios.tuning.distill import build_distill_set
    from helios.tuning.ee_tune import exit_scores, oracle, simulate

    llm = LLM(args.model, exit_heads=args.heads, exit_policy="token", kv_cache_memory=args.kv_cache_memory,
              dtype=args.dtype)
    heads = sorted(llm.engine.runner.heads.values(), key=lambda h: h.layer)
    layers, depth = [h.layer for h in heads], llm.engine.arch.num_layers
    data = build_distill_set(llm, as_requests(texts, llm.tokenizer), layers, args.max_tokens, progress=False)
    scores, agrees = exit_scores(llm.engine.model, heads, data)
    result = {"tokens": len(data), "oracle": oracle(agrees, layers, depth), "targets": {}}
    for target in args.targets:
        apply_calibration(heads, meta, target)
        result["targets"][str(target)] = simulate(scores, agrees, [h.threshold for h in heads], layers, depth)
    return result


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({r["batch"] for r in rows})
    figure, axes = plt.subplots(1, len(batches), figsize=(5 * len(batches), 4), squeeze=False)
    for ax, batch in zip(axes[0], batches):
        for policy, marker in (("token", "o"), ("batch", "s")):
            points = [r for r in rows if r["batch"] == batch and r["policy"] == policy]
            ax.plot([r["same_prefix_agreement"] for r in points], [r["speedup"] for r in points], marker=marker,
                    label=f"{policy} policy")
            for r in points:
                ax.annotate(f"target {r['target']}", (r["same_prefix_agreement"], r["speedup"]), fontsize=7)
        ax.axhline(1.0, color="grey", linestyle="--", label="full depth")
        ax.axhline(1.3, color="red", linestyle=":", label="goal 1.3x")
        ax.set_title(f"batch {batch}")
        ax.set_xlabel("token agreement with full depth (same prefix)")
        ax.set_ylabel("decode throughput / full depth")
        ax.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--heads", default=str(SHIPPED))
    parser.add_argument("--dataset", default=str(SHARED_DATA / "self_instruct_seed_tasks.jsonl"))
    parser.add_argument("--num-prompts", type=int, default=32, help="from the end of the data set")
    parser.add_argument("--num-prompts-batch1", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--targets", default=None, help="comma-separated; default: every calibrated target")
    parser.add_argument("--kv-cache-memory", type=int, default=512 << 20)
    parser.add_argument("--dtype", default="float32", help="float32: the dtype the heads were calibrated in")
    parser.add_argument("--json", default=None)
    parser.add_argument("--plot", default=None, help="PNG of throughput vs agreement (needs matplotlib)")
    args = parser.parse_args()
    torch.manual_seed(0)
    meta = json.loads(Path(args.heads, "exit_heads.json").read_text())
    args.targets = ([float(t) for t in args.targets.split(",")] if args.targets
                    else sorted(float(t) for t in meta["calibration"]))
    texts = load_prompts(args.dataset)[-args.num_prompts:]
    started = time.time()
    rows = bench_batch(args, texts[:args.num_prompts_batch1], 1, meta)
    rows += bench_batch(args, texts, args.batch_size, meta)
    report = {"command": "python " + " ".join(sys.argv), "machine": machine(), "heads": args.heads,
              "dataset": args.dataset, "num_prompts": len(texts), "max_tokens": args.max_tokens,
              "wall_seconds": time.time() - started, "results": rows,
              "teacher_forced": teacher_forced(args, texts, meta)}
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    if args.plot:
        plot(rows, args.plot)


if __name__ == "__main__":
    main()
