"""Offline throughput of two checkouts of Helios, alternated in one run (an A/B of a change).

    python bench/versions_ab.py --other /path/to/older/checkout --rounds 3 --json bench/results/engine_shape_ab.json

Each round runs this checkout and `--other` in turn, each in a fresh process (so the two
never share imports), on the same prompts (chat template applied), greedy, same max tokens
and batch size, and reports output tokens/s per run, the per-round ratio this/other and
the median round. Only the stable public API (`helios.LLM`, `SamplingParams`, the finished
output's `token_ids`) is used in the child, so any version can be measured.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.append(str(HERE.parent))

CHILD = """
import json, sys, time
from helios import LLM, SamplingParams
spec = json.load(open(sys.argv[1]))
llm = LLM(spec["model"], dtype=spec["dtype"], max_num_seqs=spec["batch_size"], kv_cache_memory=1 << 30)
prompts = [[{"role": "user", "content": p}] for p in spec["prompts"]]
params = SamplingParams(max_tokens=spec["max_tokens"], temperature=0)
llm.generate(prompts[:2], SamplingParams(max_tokens=4, temperature=0))  # warm-up
start = time.perf_counter()
outs = llm.generate(prompts, params)
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "tokens": sum(len(o.token_ids) for o in outs)}))
"""


def run_child(checkout: Path, spec_path: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(checkout))
    result = subprocess.run([sys.executable, "-c", CHILD, spec_path], env=env, capture_output=True, text=True,
                            cwd=checkout, timeout=3600)
    if result.returncode != 0:
        raise RuntimeError(f"{checkout}: {result.stderr[-2000:]}")
    row = json.loads(result.stdout.strip().splitlines()[-1])
    row["tokens_per_s"] = row["tokens"] / row["seconds"]
    return row


def main() -> None:
    from common import machine
    from helios.tuning.datasets import load_prompts

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--other", required=True, help="the checkout to compare with (e.g. a git worktree of HEAD~1)")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dataset", default=None, help="Alpaca JSON, JSONL or ShareGPT (default: shared roleplay set)")
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    spec = {"model": args.model, "dtype": args.dtype, "batch_size": args.batch_size, "max_tokens": args.max_tokens,
            "prompts": load_prompts(args.dataset, args.num_prompts)}
    this, other = HERE.parent, Path(args.other).resolve()
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec, f)
    rounds = []
    for r in range(args.rounds):
        row = {"other": run_child(other, f.name), "this": run_child(this, f.name)}
        row["ratio"] = row["this"]["tokens_per_s"] / row["other"]["tokens_per_s"]
        print(f"round {r + 1}: other {row['other']['tokens_per_s']:.1f} tok/s, this {row['this']['tokens_per_s']:.1f} "
              f"tok/s, ratio {row['ratio']:.3f}", flush=True)
        rounds.append(row)
    Path(f.name).unlink()
    result = {"command": " ".join(sys.argv), "machine": machine(), "date": time.strftime("%Y-%m-%d"),
              "this": str(this), "other": str(other), "rounds": rounds,
              "median_ratio": statistics.median(r["ratio"] for r in rounds)}
    print(f"median ratio this/other: {result['median_ratio']:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
