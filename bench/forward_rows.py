"""One forward pass over N prompt tokens: Helios against llama-cpp-python, alternated, on the same GGUF.

    python bench/forward_rows.py --rows 1,8,16,32,64 --repeats 7 --threads 2 --json bench/results/forward_rows.json

What it answers: whether llama.cpp's own arithmetic (its Q4_1 / Q8_0 dot products take 8-bit
activations) runs a step of N rows faster than Helios's float32 on this CPU. A prompt of N tokens
runs every linear layer on N rows, as a decode step of N sequences does; its attention is over at
most N tokens, so the linears dominate both. Helios: `LLMEngine.step()` on one request whose first
step is the whole prompt (prefill, then the first token's logits). llama-cpp-python: `eval` of the
same ids after a reset (logits for the last one only). Per N the two alternate `--repeats` times;
reported: median milliseconds each, and their ratio.
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
from helios import EngineConfig, LLMEngine, SamplingParams  # noqa: E402
from peers import gguf_path, load_llama_cpp  # noqa: E402


def helios_forward_ms(engine: LLMEngine, ids: list[int], tag: str) -> float:
    """The first step of a request: its whole prompt in one forward."""
    engine.add_request(ids, SamplingParams(max_tokens=1, temperature=0), tag)
    start = time.perf_counter()
    engine.step()
    took = time.perf_counter() - start
    while engine.has_unfinished():
        engine.step()
    return 1e3 * took


def llama_cpp_forward_ms(llm, ids: list[int]) -> float:
    llm.reset()
    start = time.perf_counter()
    llm.eval(ids)
    return 1e3 * (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--rows", default="1,8,16,32,64")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = [int(n) for n in args.rows.split(",")]
    engine = LLMEngine(EngineConfig(model=args.model))
    llm, why = load_llama_cpp(gguf_path(args.model), args.threads, 2 * max(rows) + 8)
    if llm is None:
        sys.exit(why)
    ids = [(17 + 7919 * i) % 40000 + 100 for i in range(max(rows))]  # fixed ids, no special tokens
    for n in rows[:1]:  # warm both: thread pools start, caches fill
        helios_forward_ms(engine, ids[:n], "warm")
        llama_cpp_forward_ms(llm, ids[:n])
    levels = []
    for n in rows:
        helios, llama = [], []
        for r in range(args.repeats):
            first, second = (helios, llama) if r % 2 == 0 else (llama, helios)
            for times in (first, second):
                if times is helios:
                    helios.append(helios_forward_ms(engine, ids[:n], f"rows-{n}-{r}"))
                else:
                    llama.append(llama_cpp_forward_ms(llm, ids[:n]))
        level = {"rows": n, "helios_ms": round(statistics.median(helios), 2),
                 "llama_cpp_ms": round(statistics.median(llama), 2)}
        level["llama_cpp_over_helios"] = round(level["llama_cpp_ms"] / level["helios_ms"], 2)
        print(json.dumps(level), flush=True)
        levels.append(level)
    report = {"command": "python " + " ".join(sys.argv), "machine": machine(), "threads": args.threads,
              "dtype": str(engine.model.embed_tokens.weight.dtype).split(".")[-1], "levels": levels}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
