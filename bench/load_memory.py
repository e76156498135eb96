"""Peak RSS of loading a model prefix vs the whole model, each in a fresh process.

    python bench/load_memory.py --model smollm2-135m --json bench/results/load_memory.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

CHILD = """
import resource, sys, json
from helios.loader import load_model
loaded = load_model(sys.argv[1], None if sys.argv[2] == "all" else int(sys.argv[2]), load_tokenizer=False)
params = sum({p.data_ptr(): p.numel() for p in loaded.model.parameters()}.values())  # tied weights once
print(json.dumps({"layers": loaded.model.num_loaded_layers, "of": loaded.arch.num_layers, "parameters": params,
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def measure(model: str, layers: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, model, layers], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    full = measure(args.model, "all")
    half = measure(args.model, str(full["of"] // 2))
    baseline = subprocess.run([sys.executable, "-c", "import resource, helios.loader, transformers, gguf;"
                               "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)"],
                              capture_output=True, text=True, check=True)
    report = {"command": "python " + " ".join(sys.argv), "model": args.model, "full": full, "half": half,
              "import_only_rss_mib": float(baseline.stdout.strip()),
              "half_over_full_rss": half["peak_rss_mib"] / full["peak_rss_mib"]}
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
