"""Engine CPU cost per generated token outside the model forward, by output length.

    python bench/engine_overhead.py --lengths 128,1024,4096 --json bench/results/engine_overhead.json
    PYTHONPATH=/path/to/older/checkout python bench/engine_overhead.py ...   # the same for another version

Runs `--num-seqs` requests of the default model's tokenizer and vocabulary to exactly N output
tokens (ignore_eos, greedy) on a one-layer prefix load, so the forward is cheap and the rest of
the step (scheduling, inputs, sampling, detokenization, stop checks, outputs) is what is left.
Time is the engine thread's CPU time (`time.thread_time`) with torch on one thread, so other
processes on a shared machine move it little; `ModelRunner.run` is measured apart and
subtracted. Reported: overhead per generated token over the whole run and per step in windows
around steps 100, 1,000 and 4,000 (where the run is that long).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.append(str(Path(__file__).resolve().parent.parent))  # after PYTHONPATH: another checkout can be measured
sys.path.insert(0, str(Path(__file__).resolve().parent))

import helios  # noqa: E402
from helios import EngineConfig, LLMEngine, SamplingParams  # noqa: E402
from common import machine  # noqa: E402

PROMPTS = ["Write a long story about a lighthouse keeper.", "Explain how rain forms, in detail.",
           "List every country you know.", "Describe a walk through a busy market.",
           "Tell me about the history of bread.", "Write a letter to a friend abroad.",
           "How do computers store numbers?", "Describe the sea at night."]


def run_length(model: str, length: int, num_seqs: int) -> dict:
    engine = LLMEngine(EngineConfig(model=model, max_layers=1, kv_cache_memory=64 << 20, max_num_seqs=num_seqs))
    forward = {"cpu": 0.0}
    run = engine.runner.run

    def timed_run(inputs):
        start = time.thread_time()
        try:
            return run(inputs)
        finally:
            forward["cpu"] += time.thread_time() - start

    engine.runner.run = timed_run
    params = SamplingParams(max_tokens=length, temperature=0, ignore_eos=True)
    for i in range(num_seqs):
        engine.add_request([{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}], params)
    per_step, tokens = [], 0
    while engine.has_unfinished():
        forward["cpu"] = 0.0
        start = time.thread_time()
        outputs = engine.step()
        per_step.append(time.thread_time() - start - forward["cpu"])
        tokens += sum(len(o.new_token_ids) for o in outputs)
    windows = {}
    for at in (100, 1000, 4000):
        if len(per_step) >= at + 50:
            window = sorted(per_step[at - 50:at + 50])
            windows[str(at)] = round(1e3 * window[len(window) // 2], 3)
    return {"output_tokens": length, "num_seqs": num_seqs, "steps": len(per_step),
            "overhead_per_token_ms": round(1e3 * sum(per_step) / tokens, 4),
            "median_step_overhead_ms_around_step": windows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--lengths", default="128,1024,4096")
    parser.add_argument("--num-seqs", type=int, default=8)
    parser.add_argument("--label", default="", help="name of the version measured (e.g. before, after)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = [run_length(args.model, int(n), args.num_seqs) for n in args.lengths.split(",")]
    for row in rows:
        print(json.dumps(row))
    result = {"label": args.label, "helios": str(Path(helios.__file__).parent), "command": " ".join(sys.argv),
              "machine": machine(), "rows": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
