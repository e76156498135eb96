"""`helios profile SLO.yaml`: measure every candidate at every allowed depth; write the model repository.

It writes the controller's model repository, so it lives in controller/; it is the one module
there that runs the engine, imported lazily inside the measuring functions, so the controller
actor and the selector (which never import this module) still load neither torch nor the
model code. (helios/ may not import controller/: only the command line reaches up.) Per candidate it loads the full depth
first (the reference for agreement and the exit distribution), then each allowed depth, and
records for each: throughput at a few batch sizes, TTFT/TPOT/latency at batch 1, weight bytes
(per layer and for the prefix; exit heads are not counted), KV bytes per token, the exit
distribution, breaches, token agreement with its own full depth and word agreement with the
reference candidate's full-depth replies (words, so candidates with different tokenizers
compare). With --answers (GSM8K-style records), also task accuracy.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger("helios.profile")
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from helios.cli_options import int_list

    parser.add_argument("slo", help="SLO file (controller/configs/example-slo.yaml shows every key)")
    parser.add_argument("--out", default=None, help="repository file (default: the SLO's `repository`)")
    parser.add_argument("--dataset", default=None, help="prompt file (default: the shared roleplay set)")
    parser.add_argument("--prompts", type=int, default=8, help="prompts per candidate and depth")
    parser.add_argument("--max-tokens", type=int, default=48, help="tokens generated per prompt")
    parser.add_argument("--batch-sizes", type=int_list, default=[1, 8, 32], help="throughput batch sizes")
    parser.add_argument("--answers", default=None, help="GSM8K-style Alpaca file: adds task_accuracy")
    parser.add_argument("--answer-prompts", type=int, default=8)
    parser.add_argument("--answer-max-tokens", type=int, default=160)
    parser.add_argument("--reference", default=None,
                        help="candidate id for reference_agreement (default: best task accuracy, else the largest)")
    parser.add_argument("--kv-cache-memory", type=int, default=256 << 20, help="KV bytes while profiling")
    parser.set_defaults(func=run_profile)


@dataclass
class Settings:
    prompts: list
    answer_prompts: list
    answers: list[str]
    max_tokens: int
    answer_max_tokens: int
    batch_sizes: list[int]
    kv_cache_memory: int


@dataclass
class DepthRun:
    """What one depth produced: figures for the repository and replies for cross-candidate quality."""

    figures: dict
    token_ids: list[list[int]]
    texts: list[str] = field(default_factory=list)
    answer_texts: list[str] = field(default_factory=list)


def _as_prompts(llm, texts: list[str]) -> list:
    use_chat = llm.tokenizer is not None and bool(getattr(llm.tokenizer, "chat_template", None))
    return [[{"role": "user", "content": t}] for t in texts] if use_chat else texts


def _timed(llm, prompts: list, params) -> tuple[list, float]:
    started = time.perf_counter()
    outputs = llm.generate(prompts, params)
    return outputs, time.perf_counter() - started


def _p95(values: list[float]) -> float:
    return sorted(values)[min(len(values) - 1, int(0.95 * len(values)))]


def latency_figures(llm, prompts: list, max_tokens: int | list[int]) -> dict:
    """Batch 1: TTFT as a one-token request; TPOT = (latency - TTFT) / (tokens - 1), per prompt.

    `max_tokens`: one length for every prompt, or one per prompt (live profiling keeps each
    mirrored request's own length). Shared by `helios profile` and controller/live_profile.py.
    """
    from helios.sampling_params import SamplingParams

    lengths = max_tokens if isinstance(max_tokens, list) else [max_tokens] * len(prompts)
    ttfts, tpots, latencies = [], [], []
    for prompt, length in zip(prompts, lengths):
        _, ttft = _timed(llm, [prompt], SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))
        _, latency = _timed(llm, [prompt], SamplingParams(max_tokens=length, temperature=0, ignore_eos=True))
        ttfts.append(ttft)
        latencies.append(latency)
        tpots.append(max(0.0, latency - ttft) / max(1, length - 1))
    return {"ttft_s": statistics.mean(ttfts), "ttft_p95_s": _p95(ttfts), "tpot_s": statistics.mean(tpots),
            "tpot_p95_s": _p95(tpots), "latency_s": statistics.mean(latencies)}


def _throughput(llm, prompts: list, batch_sizes: list[int], max_tokens: int) -> dict[int, float]:
    from helios.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    rates = {}
    for batch in batch_sizes:
        outputs, seconds = _timed(llm, [prompts[i % len(prompts)] for i in range(batch)], params)
        rates[batch] = sum(len(o.token_ids) for o in outputs) / seconds
    return rates


def _memory(llm) -> dict:
    """Weight bytes shared and per layer, KV bytes per token per layer, as loaded (dtype included)."""
    from helios.block_manager import kv_bytes_per_token

    model, arch = llm.engine.model, llm.engine.arch
    per_layer = [0] * arch.num_layers
    total = 0
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        size = tensor.numel() * tensor.element_size()
        total += size
        match = _LAYER.search(name)
        if match:
            per_layer[int(match.group(1))] += size
    dtype_bytes = next(model.parameters()).element_size()
    return {"num_layers": arch.num_layers, "weight_bytes_per_layer": per_layer,
            "weight_bytes_shared": total - sum(per_layer),
            "kv_bytes_per_token_per_layer": kv_bytes_per_token(1, arch.num_kv_heads, arch.head_dim, dtype_bytes)}


def greedy_run(llm, prompts: list, params) -> tuple[list, dict, float]:
    """Generate `prompts` together (`params`: one SamplingParams, or one per prompt); return the
    outputs, their exit distribution and breach share, and the seconds taken.
    Shared by `helios profile` and controller/live_profile.py."""
    from controller.quality import exit_distribution

    stats = llm.engine.stats
    breaches, tokens = stats.confidence_breaches, stats.generation_tokens
    outputs, seconds = _timed(llm, prompts, params)
    generated = stats.generation_tokens - tokens
    figures = {"exit_distribution": exit_distribution([o.exit_layers for o in outputs]),
               "breach_share": (stats.confidence_breaches - breaches) / generated if generated else 0.0}
    return outputs, figures, seconds


def _measure(llm, settings: Settings, full: DepthRun | None) -> DepthRun:
    """One depth: quality and exits on greedy replies, then speed."""
    from controller.quality import answer_accuracy, token_agreement
    from helios.sampling_params import SamplingParams

    prompts = _as_prompts(llm, settings.prompts)
    outputs, figures, _ = greedy_run(llm, prompts, SamplingParams(max_tokens=settings.max_tokens, temperature=0))
    token_ids = [o.token_ids for o in outputs]
    figures["agreement"] = token_agreement(token_ids, full.token_ids) if full else 1.0
    run = DepthRun(figures, token_ids, [o.text for o in outputs])
    if settings.answer_prompts:
        replies = llm.generate(_as_prompts(llm, settings.answer_prompts),
                               SamplingParams(max_tokens=settings.answer_max_tokens, temperature=0))
        run.answer_texts = [o.text for o in replies]
        figures["task_accuracy"] = answer_accuracy(run.answer_texts, settings.answers)
    figures.update(latency_figures(llm, prompts[: max(1, min(len(prompts), 5))], settings.max_tokens))
    figures["throughput"] = _throughput(llm, prompts, settings.batch_sizes, settings.max_tokens)
    return run


def engine_options(candidate, kv_cache_memory: int) -> dict:
    """LLM keyword options for a candidate, less the depth (the caller's) and with its own KV cache."""
    engine = candidate.engine_config()
    options = {k: v for k, v in vars(engine).items() if k not in ("model", "max_layers", "kv_cache_memory")}
    return {**options, "kv_cache_memory": kv_cache_memory}


def _run_depth(llm, candidate_id: str, depth: int, settings: Settings, full: DepthRun | None) -> DepthRun:
    started = time.monotonic()
    llm.generate(_as_prompts(llm, settings.prompts[:1]), None)  # warm-up: first-call costs out of the timings
    run = _measure(llm, settings, full)
    largest = max(settings.batch_sizes)
    logger.info("%s at %d layers: %.1f tok/s at batch %d, agreement %.3f (%.0f s)", candidate_id, depth,
                run.figures["throughput"][largest], largest, run.figures["agreement"], time.monotonic() - started)
    return run


def profile_candidate(candidate, settings: Settings) -> tuple[dict, dict[int, DepthRun]]:
    """(the candidate's repository entry without its depths, each depth's run); full depth always included."""
    from helios import LLM

    options = engine_options(candidate, settings.kv_cache_memory)
    llm = LLM(candidate.source, **options)  # full depth first: its size, and the reference for the prefixes
    entry = {"source": candidate.source, **_memory(llm)}
    num_layers = entry["num_layers"]
    if any(d > num_layers for d in candidate.depths):
        raise ValueError(f"{candidate.id}: depths {candidate.depths} exceed its {num_layers} layers")
    runs = {num_layers: _run_depth(llm, candidate.id, num_layers, settings, None)}
    del llm
    for depth in [d for d in candidate.depths if d < num_layers]:
        llm = LLM(candidate.source, max_layers=depth, **options)
        runs[depth] = _run_depth(llm, candidate.id, depth, settings, runs[num_layers])
        del llm
    return entry, runs


def word_agreement(texts: list[str], references: list[str]) -> float:
    """Token agreement over whitespace words: candidates with different tokenizers compare.
    Shared by `helios profile` and controller/live_profile.py."""
    from controller.quality import token_agreement

    return token_agreement([t.split() for t in texts], [r.split() for r in references])


def _reference(chosen: str | None, entries: dict, runs: dict) -> str:
    if chosen:
        if chosen not in entries:
            raise ValueError(f"--reference {chosen!r} is not a candidate")
        return chosen
    def strength(cid: str) -> tuple[float, int]:  # task accuracy at full depth where measured, then size
        accuracy = runs[cid][entries[cid]["num_layers"]].figures.get("task_accuracy", 0.0)
        return accuracy, sum(entries[cid]["weight_bytes_per_layer"]) + entries[cid]["weight_bytes_shared"]

    return max(entries, key=strength)


def build_repository(slo, settings: Settings, reference: str | None, command: str, machine: str):
    from controller.repository import parse_repository

    entries, runs = {}, {}
    for candidate in slo.candidates:
        entries[candidate.id], runs[candidate.id] = profile_candidate(candidate, settings)
    reference = _reference(reference, entries, runs)
    reference_texts = runs[reference][entries[reference]["num_layers"]].texts
    for cid, entry in entries.items():
        per_layer = entry["kv_bytes_per_token_per_layer"]
        entry["depths"] = {}
        for depth, run in runs[cid].items():
            weights = entry["weight_bytes_shared"] + sum(entry["weight_bytes_per_layer"][:depth])
            entry["depths"][depth] = {**run.figures, "weight_bytes": weights, "kv_bytes_per_token": per_layer * depth,
                                      "reference_agreement": word_agreement(run.texts, reference_texts)}
    settings_record = {"prompts": len(settings.prompts), "max_tokens": settings.max_tokens,
                       "batch_sizes": settings.batch_sizes, "answer_prompts": len(settings.answer_prompts)}
    return parse_repository({"command": command, "machine": machine, "reference": reference,
                             "settings": settings_record, "candidates": entries})


def _machine() -> str:
    import torch

    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{os.cpu_count()} CPU cores, {memory:.0f} GiB, {gpu}, torch {torch.__version__}"


def _answer_set(path: str | None, limit: int) -> tuple[list[str], list[str]]:
    """(questions, answers) from an Alpaca file whose `output` ends with the answer (GSM8K)."""
    if not path:
        return [], []
    records = json.loads(Path(path).read_text())[:limit]
    return [r["instruction"] for r in records], [r["output"] for r in records]


def run_profile(args: argparse.Namespace) -> int:
    from controller.repository import save_repository
    from controller.slo import load_slo
    from helios.tuning.datasets import load_prompts

    slo = load_slo(args.slo)
    questions, answers = _answer_set(args.answers, args.answer_prompts)
    settings = Settings(load_prompts(args.dataset, args.prompts), questions, answers, args.max_tokens,
                        args.answer_max_tokens, args.batch_sizes, args.kv_cache_memory)
    command = "helios " + " ".join(getattr(args, "argv", None) or sys.argv[1:])
    repository = build_repository(slo, settings, args.reference, command, _machine())
    out = Path(args.out or slo.repository)
    save_repository(repository, out)
    print(f"wrote {out}: {len(repository.candidates)} candidate(s), reference {repository.reference}")
    return 0
