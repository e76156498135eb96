"""Model load time, this checkout vs a git revision, each load in a fresh process, alternated.

    python bench/load_time.py --baseline HEAD~1 --models smollm2-135m,qwen2.5-coder-0.5b,gemma3-270m \
        --rounds 3 --json bench/results/load_time.json

A load is `helios.loader.load_model(alias, max_layers, dtype)` with the tokenizer, timed inside a
fresh Python process after its imports (torch, transformers, helios), so it counts what an
engine pays at start-up and what the controller pays for every change of model or depth.
`--baseline` is checked out into a temporary git worktree; the current checkout runs as it is
on disk. Before the timed rounds each side loads every model once, untimed, so that both run
warm: the page cache holds the files and this checkout's cached GGUF headers exist (the state
after a replica's first start). Reported per model and side: every round's seconds and the
median, and the ratio baseline / current.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from common import machine  # noqa: E402

PROBE = """
import sys, time
sys.path.insert(0, sys.argv[1])
import torch, transformers
from helios.loader import load_model
started = time.perf_counter()
load_model(sys.argv[2], None if sys.argv[3] == "all" else int(sys.argv[3]), dtype=sys.argv[4])
print(time.perf_counter() - started)
"""


def load_seconds(checkout: Path, model: str, layers: str, dtype: str) -> float:
    done = subprocess.run([sys.executable, "-c", PROBE, str(checkout), model, layers, dtype],
                          check=True, capture_output=True, text=True, cwd=checkout)
    return float(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--baseline", default="HEAD", help="git revision to compare with")
    parser.add_argument("--models", default="smollm2-135m")
    parser.add_argument("--layers", default="all", help="layers to load (all, or a prefix length)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    models = args.models.split(",")
    with tempfile.TemporaryDirectory() as scratch:
        baseline = Path(scratch) / "baseline"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(baseline), args.baseline],
                       check=True, capture_output=True)
        try:
            sides = {"baseline": baseline, "current": ROOT}
            for model in models:  # warm: page cache, cached headers
                for checkout in sides.values():
                    load_seconds(checkout, model, args.layers, args.dtype)
            seconds = {model: {side: [] for side in sides} for model in models}
            for round_index in range(args.rounds):
                order = list(sides) if round_index % 2 == 0 else list(reversed(sides))
                for model in models:
                    for side in order:
                        seconds[model][side].append(load_seconds(sides[side], model, args.layers, args.dtype))
                        print(f"round {round_index} {model} {side}: {seconds[model][side][-1]:.2f} s", flush=True)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(baseline)], check=False)
    results = {model: {**{side: {"seconds": s, "median_s": statistics.median(s)} for side, s in by_side.items()},
                       "ratio_baseline_over_current": statistics.median(by_side["baseline"])
                       / statistics.median(by_side["current"])}
               for model, by_side in seconds.items()}
    for model, result in results.items():
        print(f"{model}: baseline {result['baseline']['median_s']:.2f} s, current {result['current']['median_s']:.2f} s,"
              f" {result['ratio_baseline_over_current']:.2f}x")
    if args.json:
        command = "python bench/load_time.py " + " ".join(sys.argv[1:])
        args.json.write_text(json.dumps({"command": command, "machine": machine(), "layers": args.layers,
                                         "dtype": args.dtype, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
