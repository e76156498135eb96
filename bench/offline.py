"""Offline throughput, side by side in one process: transformers vs Helios (full, batch, token).

    python bench/offline.py --num-prompts 64 --max-tokens 128 --json bench/results/offline.json
    python bench/offline.py --exit-profile 6:0.74,12:0.1,18:0.08,30:0.08 --json ...

Same prompts (chat template applied), greedy, same max tokens and maximum batch size for
every system. Reports output tokens/s, the ratio to transformers, the mean exit layer and
token agreement with Helios full depth (the share of full-depth tokens matched position by
position). With --exit-profile each token's exit layer is drawn from the given
distribution while exit checks, KV fill and batching run for real; the realized speed-up
over full depth is set against the ideal one from layer arithmetic.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from helios import LLM, SamplingParams  # noqa: E402
from helios.tuning.datasets import load_prompts  # noqa: E402
from common import energy_window, machine, median_run  # noqa: E402


def agreement(outputs: list[list[int]], reference: list[list[int]]) -> float:
    matched = sum(sum(a == b for a, b in zip(o, r)) for o, r in zip(outputs, reference))
    return matched / max(1, sum(len(r) for r in reference))


def load_transformers(model_ref: str, dtype: torch.dtype):
    """transformers' model class holding the very weights Helios loads (from a GGUF file,
    transformers' own loader would keep some tensors quantized and run other kernels)."""
    from transformers import AutoModelForCausalLM

    from helios.loader import hf_weights

    config, get = hf_weights(model_ref)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    state = {n: get(n) for n in model.state_dict() if n not in tied}
    missing = [n for n, t in state.items() if t is None]
    if missing:
        raise RuntimeError(f"weights missing for transformers: {missing[:3]}")
    model.load_state_dict({n: t.to(dtype) for n, t in state.items()}, strict=not tied)
    return model.eval()


def run_transformers(model, prompt_ids: list[list[int]], max_tokens: int, batch_size: int,
                     eos_ids: set[int]) -> dict:
    """Static batches with transformers generate: a batch runs until its longest answer ends."""
    pad = next(iter(eos_ids))
    outputs = []
    with energy_window() as energy:
        start = time.perf_counter()
        for i in range(0, len(prompt_ids), batch_size):
            batch = prompt_ids[i:i + batch_size]
            width = max(map(len, batch))
            ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
            with torch.inference_mode():
                gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_tokens, do_sample=False,
                                     eos_token_id=list(eos_ids), pad_token_id=pad)[:, width:].tolist()
            for row in gen:  # keep tokens up to and including the first EOS
                cut = next((j + 1 for j, t in enumerate(row) if t in eos_ids), len(row))
                outputs.append(row[:cut])
        seconds = time.perf_counter() - start
    return {"system": "transformers-static", "seconds": seconds, "tokens": outputs, "joules": energy.joules}


def time_decode_steps(llm: LLM) -> dict:
    """Time model steps that hold only decodes: exits act there, not on prompts."""
    totals = {"seconds": 0.0, "tokens": 0}
    runner = llm.engine.runner
    run = runner.__dict__.setdefault("untimed_run", runner.run)  # one wrapper however often we run

    def timed(inputs):
        start = time.perf_counter()
        result = run(inputs)
        if not inputs.attention.prefill:  # decode-only step
            totals["seconds"] += time.perf_counter() - start
            totals["tokens"] += len(inputs.sample_rows)
        return result

    runner.run = timed
    return totals


def run_helios(name: str, llm: LLM, prompt_ids: list[list[int]], max_tokens: int) -> dict:
    params = SamplingParams(max_tokens=max_tokens, temperature=0)
    decode = time_decode_steps(llm)
    with energy_window() as energy:
        start = time.perf_counter()
        outs = llm.generate(prompt_ids, params)
        elapsed = time.perf_counter() - start
    layers = [layer for o in outs for layer in o.exit_layers]
    return {"system": name, "seconds": elapsed, "tokens": [o.token_ids for o in outs], "joules": energy.joules,
            "mean_exit_layer": statistics.fmean(layers),
            "decode_tokens_per_s": decode["tokens"] / max(decode["seconds"], 1e-9)}


def summarize(result: dict, reference: list[list[int]] | None, baseline_tps: float | None) -> dict:
    n = sum(map(len, result["tokens"]))
    row = {k: v for k, v in result.items() if k != "tokens"}
    row["output_tokens"] = n
    row["tokens_per_s"] = n / result["seconds"]
    # measured where the machine has a meter (RAPL, NVML), else None: never estimated
    row["energy_per_token_j"] = result["joules"] / n if result.get("joules") is not None and n else None
    if baseline_tps:
        row["ratio_to_transformers"] = row["tokens_per_s"] / baseline_tps
    if reference is not None:
        row["agreement_with_full"] = agreement(result["tokens"], reference)
    return row


def parse_profile(text: str) -> dict[int, float]:
    if Path(text).is_file():  # a {layer: share} JSON, e.g. read from a real run
        return {int(k): float(v) for k, v in json.loads(Path(text).read_text()).items()}
    pairs = [p.split(":") for p in text.split(",")]
    return {int(layer): float(share) for layer, share in pairs}


def tokens_per_s(result: dict) -> float:
    return sum(map(len, result["tokens"])) / result["seconds"]


def bench_real(args, prompt_ids, eos_ids, dtype_name) -> list[dict]:
    """transformers and Helios full depth alternate --repeat times (the machine drifts; each
    pair's ratio is taken in the same minutes, and the median pair reported), then the
    early-exit policies once against the median transformers run."""
    common = dict(max_num_seqs=args.batch_size, kv_cache_memory=args.kv_cache_memory, dtype=dtype_name)
    exits = dict(exit_layers=args.exit_layers, exit_threshold=args.exit_threshold, confidence=args.confidence)
    hf_model = load_transformers(args.model, getattr(torch, dtype_name))
    full_llm = LLM(args.model, **common)
    pairs = []
    for _ in range(args.repeat):
        hf = run_transformers(hf_model, prompt_ids, args.max_tokens, args.batch_size, eos_ids)
        full = run_helios("helios-full", full_llm, prompt_ids, args.max_tokens)
        pairs.append((tokens_per_s(full) / tokens_per_s(hf), hf, full))
    del hf_model, full_llm
    gc.collect()
    ratio, hf, full = median_run(pairs, key=lambda pair: pair[0])
    base_tps = tokens_per_s(hf)
    rows = [summarize(hf, full["tokens"], base_tps), summarize(full, full["tokens"], base_tps)]
    rows[1]["ratio_runs"] = [pair[0] for pair in pairs]
    for policy in ("batch", "token"):
        llm = LLM(args.model, exit_policy=policy, **exits, **common)
        rows.append(summarize(run_helios(f"helios-{policy}", llm, prompt_ids, args.max_tokens), full["tokens"], base_tps))
        del llm
    return rows


def bench_synthetic(args, prompt_ids, dtype_name) -> list[dict]:
    """Realized vs ideal speed-up of synthetic exits, at batch 1 and at --batch-size. Full
    depth and each policy run in turn, --repeat rounds (the machine drifts; each round's
    ratios are taken in the same minutes); each policy's median round is reported."""
    profile = parse_profile(args.exit_profile)
    rows = []
    for batch, prompts in ((1, prompt_ids[: args.num_prompts_batch1]), (args.batch_size, prompt_ids)):
        common = dict(max_num_seqs=batch, kv_cache_memory=args.kv_cache_memory, dtype=dtype_name)
        llms = {"none": LLM(args.model, **common)}
        depth = llms["none"].engine.num_loaded_layers
        for policy in ("batch", "token"):
            llms[policy] = LLM(args.model, exit_policy=policy, exit_layers=sorted(l for l in profile if l < depth),
                               exit_profile=profile, confidence=args.confidence, **common)
        rounds = [{name: run_helios(f"helios-{name}", llm, prompts, args.max_tokens) for name, llm in llms.items()}
                  for _ in range(args.repeat)]
        del llms
        gc.collect()
        for policy in ("batch", "token"):
            measured = [synthetic_row(batch, policy, depth, r["none"], r[policy]) for r in rounds]
            row = median_run(measured, key=lambda row: row["realized_speedup"])
            row["realized_speedup_runs"] = sorted(m["realized_speedup"] for m in measured)
            rows.append(row)
    return rows


def synthetic_row(batch: int, policy: str, depth: int, full: dict, run: dict) -> dict:
    # decode steps only (prompts run full depth either way); per token, since synthetic
    # exits change the text and so the lengths
    realized = run["decode_tokens_per_s"] / full["decode_tokens_per_s"]
    ideal = depth / run["mean_exit_layer"]
    return {"batch": batch, "policy": policy, "mean_exit_layer": run["mean_exit_layer"],
            "full_decode_tokens_per_s": full["decode_tokens_per_s"],
            "exit_decode_tokens_per_s": run["decode_tokens_per_s"],
            "realized_speedup": realized, "ideal_speedup_layers": ideal, "realized_over_ideal": realized / ideal,
            "end_to_end_speedup": tokens_per_s(run) / tokens_per_s(full)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dataset", default=None, help="Alpaca JSON, JSONL or ShareGPT (default: shared roleplay set)")
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--num-prompts-batch1", type=int, default=8, help="synthetic mode, batch 1")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=64, help="max batch size, the same for every system")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--repeat", type=int, default=1,
                        help="transformers / Helios full-depth pairs to run; synthetic mode: rounds of every policy")
    parser.add_argument("--kv-cache-memory", type=int, default=1 << 30)
    parser.add_argument("--exit-layers", default="6,12,18,24")
    parser.add_argument("--exit-threshold", type=float, default=0.9)
    parser.add_argument("--confidence", default="max_prob")
    parser.add_argument("--exit-profile", default=None, help="synthetic exits: LAYER:SHARE,... or a JSON file")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()
    args.exit_layers = [int(x) for x in args.exit_layers.split(",")]
    torch.manual_seed(0)

    prompts = load_prompts(args.dataset, args.num_prompts)
    tokenizer_llm = LLM(args.model, kv_cache_memory=1 << 20)
    prompt_ids = [tokenizer_llm.engine.encode([{"role": "user", "content": p}]) for p in prompts]
    eos_ids = set(tokenizer_llm.engine.outputs.eos_ids)
    del tokenizer_llm

    started = time.time()
    if args.exit_profile:
        rows = bench_synthetic(args, prompt_ids, args.dtype)
    else:
        rows = bench_real(args, prompt_ids, eos_ids, args.dtype)
    report = {"command": "python " + " ".join(sys.argv), "machine": machine(), "dataset": str(args.dataset or "default"),
              "num_prompts": len(prompt_ids), "max_tokens": args.max_tokens, "batch_size": args.batch_size,
              "dtype": args.dtype, "wall_seconds": time.time() - started, "results": rows}
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
