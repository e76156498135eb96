"""Helios against the peers a user would pick instead, side by side in one run on this machine.

    python bench/peers.py --concurrency 1,8,32 --requests 4,32,96 --max-tokens 512 --json bench/results/peers.json

Systems: Helios in-process (`LLMEngine`, continuous batching, default dtype), transformers
`generate` in static batches (the very weights Helios loads, same dtype), and llama-cpp-python
on the model's GGUF file itself (its own quantized kernels; one sequence at a time, as it does
not batch across requests). Workload: self-instruct seed instructions (chat template applied,
the same token ids for all three), greedy, natural end of sequence, at most `--max-tokens`.

Concurrency c is a closed loop of c clients: each sends its next request when its previous
answer is complete. Helios admits a request the moment it arrives; transformers runs batches
of c and answers a batch when its longest answer ends; llama-cpp serves one request at a time
in arrival order. TTFT counts from a request's arrival (so queueing is in it). With as many
requests as clients a level is a single wave, and its throughput is set by the longest answer
(the tail runs a few rows at a time); several requests per client measure the steady state a
server runs in, hence the default of three to four per client. At each level
the systems run in turn `--rounds` times (the order rotates); reported per system: output
tokens/s and median TTFT of the median round, and per round the ratio Helios / peer.
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

from common import machine, median_run  # noqa: E402
from helios import EngineConfig, LLMEngine, SamplingParams  # noqa: E402
from helios.tuning.datasets import SHARED_DATA, load_prompts  # noqa: E402

DATASET = SHARED_DATA / "self_instruct_seed_tasks.jsonl"


def result(name: str, seconds: float, cpu: float, tokens: list[list[int]], ttft: list[float]) -> dict:
    """One system's run; `cpu`: the process's CPU seconds, the figure other jobs on the machine move least."""
    total = sum(map(len, tokens))
    return {"system": name, "seconds": round(seconds, 2), "requests": len(tokens), "output_tokens": total,
            "tokens_per_s": round(total / seconds, 2), "median_ttft_ms": round(1e3 * statistics.median(ttft), 1),
            "mean_output_tokens": round(total / len(tokens), 1), "cpu_seconds": round(cpu, 2),
            "tokens_per_cpu_s": round(total / cpu, 2)}


def run_helios(engine: LLMEngine, prompts: list[list[int]], clients: int, max_tokens: int) -> dict:
    """Closed loop: `clients` requests in flight; a finished one is replaced at once."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0)
    pending, arrival, first, done = list(enumerate(prompts)), {}, {}, {}
    start, cpu = time.perf_counter(), time.process_time()
    while pending or engine.has_unfinished():
        while pending and len(arrival) - len(done) < clients:
            index, ids = pending.pop(0)
            engine.add_request(ids, params, f"peers-{index}")
            arrival[index] = time.perf_counter()
        for out in engine.step():
            index, now = int(out.request_id.split("-")[1]), time.perf_counter()
            if out.new_token_ids:
                first.setdefault(index, now)
            if out.finished:
                done[index] = out.token_ids
    seconds = time.perf_counter() - start
    return result("helios", seconds, time.process_time() - cpu, [done[i] for i in sorted(done)],
                  [first[i] - arrival[i] for i in first])


class FirstCall:
    """A logits processor that notes when generate reaches its first token (the batch's prefill done)."""

    def __init__(self):
        self.time = None

    def __call__(self, input_ids, scores):
        if self.time is None:
            self.time = time.perf_counter()
        return scores


def run_transformers(model, prompts: list[list[int]], clients: int, max_tokens: int, eos_ids: set[int]) -> dict:
    """Static batches of `clients`: a batch's answers return when its longest ends; the next batch's
    requests arrive then (their clients were waiting), so TTFT is the batch's prefill."""
    from transformers import LogitsProcessorList

    pad, tokens, ttft = min(eos_ids), [], []
    start, cpu = time.perf_counter(), time.process_time()
    for i in range(0, len(prompts), clients):
        batch, began = prompts[i:i + clients], time.perf_counter()
        width = max(map(len, batch))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
        first = FirstCall()
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_tokens, do_sample=False,
                                 eos_token_id=sorted(eos_ids), pad_token_id=pad,
                                 logits_processor=LogitsProcessorList([first]))[:, width:].tolist()
        for row in out:  # up to and including the first EOS
            tokens.append(row[:next((j + 1 for j, t in enumerate(row) if t in eos_ids), len(row))])
        ttft += [first.time - began] * len(batch)
    return result("transformers-static", time.perf_counter() - start, time.process_time() - cpu, tokens, ttft)


def run_llama_cpp(llm, prompts: list[list[int]], clients: int, max_tokens: int, eos_ids: set[int]) -> dict:
    """One request at a time in arrival order; request j arrives when request j - clients is answered."""
    tokens, ttft, finished = [], [], []
    start, cpu = time.perf_counter(), time.process_time()
    for j, ids in enumerate(prompts):
        arrival = start if j < clients else finished[j - clients]
        out, first = [], None
        for token in llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
            first = first or time.perf_counter()
            out.append(token)
            if token in eos_ids or len(out) >= max_tokens:
                break
        finished.append(time.perf_counter())
        tokens.append(out)
        ttft.append(first - arrival)
    return result("llama-cpp-python", time.perf_counter() - start, time.process_time() - cpu, tokens, ttft)


def load_llama_cpp(gguf: str, threads: int, context: int):
    """llama-cpp-python's model on the GGUF file, or the reason it is not available."""
    try:
        from llama_cpp import Llama
    except ImportError as exc:
        return None, f"llama_cpp not importable: {exc}"
    return Llama(model_path=gguf, n_ctx=context, n_batch=512, n_threads=threads, n_threads_batch=threads,
                 verbose=False), None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--requests", default="4,32,96", help="requests per concurrency level")
    parser.add_argument("--max-tokens", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="threads for every system")
    parser.add_argument("--systems", default="helios,transformers,llama-cpp")
    parser.add_argument("--json", default=None)
    parser.add_argument("--append", action="store_true", help="add this run to the runs already in --json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load = Path("/proc/loadavg").read_text().split()[:3]
    levels = list(zip(map(int, args.concurrency.split(",")), map(int, args.requests.split(","))))
    texts = load_prompts(DATASET, max(n for _, n in levels))
    engine = LLMEngine(EngineConfig(model=args.model, max_num_seqs=64))
    prompts = [engine.encode([{"role": "user", "content": t}]) for t in texts]
    eos_ids, dtype = set(engine.outputs.eos_ids), engine.model.embed_tokens.weight.dtype
    systems, notes = {}, {}
    if "helios" in args.systems:
        systems["helios"] = lambda p, c: run_helios(engine, p, c, args.max_tokens)
    if "transformers" in args.systems:
        from offline import load_transformers
        hf = load_transformers(args.model, dtype)
        systems["transformers-static"] = lambda p, c: run_transformers(hf, p, c, args.max_tokens, eos_ids)
    if "llama-cpp" in args.systems:
        gguf = engine.config.model if engine.config.model.endswith(".gguf") else gguf_path(args.model)
        llm, why = load_llama_cpp(gguf, args.threads, 2048)
        if llm is None:
            notes["llama-cpp-python"] = why
        else:
            systems["llama-cpp-python"] = lambda p, c: run_llama_cpp(llm, p, c, args.max_tokens, eos_ids)
    rows = []
    for clients, count in levels:
        names, rounds = list(systems), []
        for r in range(args.rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            rounds.append({name: systems[name](prompts[:count], clients) for name in order})
            print(clients, json.dumps(rounds[-1]), flush=True)
        rows.append(level_row(clients, count, rounds))
    report = {"command": "python " + " ".join(sys.argv), "machine": machine(), "threads": args.threads,
              "dtype": str(dtype).split(".")[-1], "dataset": str(DATASET.name), "max_tokens": args.max_tokens,
              "loadavg_start": load, "loadavg_end": Path("/proc/loadavg").read_text().split()[:3],
              "not_run": notes, "levels": rows}
    print(json.dumps(report, indent=2))
    if args.json:
        path = Path(args.json)
        runs = json.loads(path.read_text())["runs"] if args.append and path.is_file() else []
        path.write_text(json.dumps({"runs": runs + [report]}, indent=2) + "\n")


def level_row(clients: int, count: int, rounds: list[dict]) -> dict:
    """Each system's median round, and every round's Helios / peer ratios of tokens/s."""
    row = {"concurrency": clients, "requests": count, "systems": {}}
    for name in rounds[0]:
        row["systems"][name] = median_run([r[name] for r in rounds], key=lambda x: x["tokens_per_s"])
        if name != "helios" and "helios" in rounds[0]:
            row["systems"][name]["helios_over_this_tokens_per_s"] = [
                round(r["helios"]["tokens_per_s"] / r[name]["tokens_per_s"], 2) for r in rounds]
    return row


def gguf_path(alias: str) -> str:
    from helios.catalog import lookup
    from helios.model_cache import model_file

    return str(model_file(lookup(alias)))


if __name__ == "__main__":
    main()
