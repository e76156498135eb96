"""The `helios length-tune` command: generate, train, evaluate on held-out sets, write the head and report."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

from helios.length import LengthHeadSpec, save_length_head
from helios.tuning.datasets import SHARED_DATA, sample_requests
from helios.tuning.length_tune import LengthData, TrainOptions, collect, evaluate, head_cost, train_head

logger = logging.getLogger("helios.tune")


class _Progress:
    def __init__(self, total: int, desc: str):
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc=desc, unit="gen")

    def __call__(self, n: int) -> None:
        self.bar.update(n)


def _collect(llm, prompts, args, desc: str) -> LengthData:
    progress = _Progress(len(prompts) * (1 + args.num_samples), desc)
    data = collect(llm, prompts, args.layers, args.max_tokens, args.num_samples, args.temperature, args.seed, progress)
    progress.bar.close()
    return data


def run_length_tune(args) -> int:
    from helios import LLM

    started = time.monotonic()
    llm = LLM(args.model, kv_cache_memory=args.kv_cache_memory, device=args.device, dtype=args.dtype,
              max_num_seqs=args.batch_size)
    arch = llm.engine.arch
    layers = sorted(set(args.layers))
    if layers[-1] > arch.num_layers or layers[0] < 1:
        raise ValueError(f"--layers must be in 1..{arch.num_layers}, got {layers}")
    args.layers = layers
    train_prompts = sample_requests(args.dataset, args.num_prompts, llm.tokenizer)
    heldout = {Path(f).name: sample_requests([f], args.heldout_prompts, llm.tokenizer) for f in args.heldout}
    logger.info("length-tune: %d training prompts from %s; held out: %s; %d tokens at most, greedy + %d samples",
                len(train_prompts), args.dataset, {k: len(v) for k, v in heldout.items()}, args.max_tokens,
                args.num_samples)
    if args.from_pairs:  # the pairs of an earlier run (--save-data): retrain without generating
        saved = torch.load(args.from_pairs, weights_only=False)
        train, tests = saved["train"], saved["heldout"]
    else:
        train = _collect(llm, train_prompts, args, "generating (training)")
        tests = {name: _collect(llm, prompts, args, f"generating ({name})") for name, prompts in heldout.items()}
    generated = time.monotonic()
    report = {"command": args.command_line, "cap_max_tokens": args.max_tokens, "layers": layers,
              "num_samples": args.num_samples, "temperature": args.temperature, "label": args.label,
              "datasets": {"train": args.dataset, "heldout": args.heldout}, "train_prompts": len(train.greedy),
              "generation_seconds": generated - started, "heads": {}}
    heads = {}
    for label in ("max", "greedy"):  # the shipped label first; the other for comparison
        labels = train.labels(label)
        spec = LengthHeadSpec(arch.hidden_size, arch.num_layers, layers, args.max_tokens, args.hidden,
                              label="greedy" if label == "greedy" else f"max_of_{args.num_samples}")
        options = TrainOptions(hidden=args.hidden, epochs=args.epochs, seed=args.seed)
        head, fit = train_head(train.features, labels, spec, options)
        median = float(labels.median())
        heads[label] = head
        report["heads"][label] = {"fit": fit, "train_median": median, "train_label_mean": float(labels.mean()),
                                  "heldout": {name: evaluate(head, data, median) for name, data in tests.items()}}
    head = heads[args.label]
    report["cost"] = head_cost(head, arch.hidden_size)
    report["seconds"] = time.monotonic() - started
    save_length_head(args.out, head, extra={"report": "report.json"})
    Path(args.out, "report.json").write_text(json.dumps(report, indent=2))
    if args.save_data:
        torch.save({"train": train, "heldout": tests}, Path(args.out, "pairs.pt"))
    _print_summary(report, args.out)
    return 0


def main(args) -> int:
    """The CLI entry: default data sets, the command line for the report."""
    import sys

    args.dataset = args.dataset or args.default_train
    args.heldout = args.heldout or args.default_heldout
    args.command_line = "helios " + " ".join(sys.argv[1:])
    return run_length_tune(args)


def _print_summary(report: dict, out: str) -> None:
    print(f"length head written to {out} (label {report['label']}, cap {report['cap_max_tokens']} tokens, "
          f"{report['seconds']:.0f} s)")
    for label, row in report["heads"].items():
        for name, result in row["heldout"].items():
            for target in ("greedy", "max"):
                r = result[target]
                print(f"  head[{label}] on {name} vs {target} length: MAE {r['mae']:.1f} "
                      f"(median baseline {r['baseline_median']['mae']:.1f}), within 50 {r['within_50']:.2f}, "
                      f"within 100 {r['within_100']:.2f}, Spearman {r['spearman']:.2f}")
    print(f"  cost: {report['cost']['seconds_one_request'] * 1e6:.0f} us for one request")


def add_arguments(parser) -> None:
    from helios.cli_options import add_engine_arguments, int_list

    add_engine_arguments(parser, only={"model", "kv_cache_memory", "device", "dtype"},
                         defaults={"kv_cache_memory": 1 << 30})
    parser.add_argument("--layers", type=int_list, default=[15, 30],
                        help="layers run when the prompt state is taken, e.g. 15,30")
    parser.add_argument("--dataset", action="append", default=None,
                        help="training prompts (repeat for several files; default: three shared sets)")
    parser.add_argument("--heldout", action="append", default=None,
                        help="held-out prompt files, each reported apart (default: the shared self-instruct seed tasks)")
    parser.add_argument("--out", required=True, help="folder for length_head.json/.safetensors and report.json")
    parser.add_argument("--num-prompts", type=int, default=300)
    parser.add_argument("--heldout-prompts", type=int, default=175, help="prompts per held-out file")
    parser.add_argument("--max-tokens", type=int, default=256, help="the cap on generated lengths (and predictions)")
    parser.add_argument("--num-samples", type=int, default=3, help="sampled generations per prompt (label: their max)")
    parser.add_argument("--temperature", type=float, default=0.8, help="of the sampled generations")
    parser.add_argument("--label", choices=("max", "greedy"), default="max", help="the label of the written head")
    parser.add_argument("--batch-size", type=int, default=64, help="sequences generated at once")
    parser.add_argument("--hidden", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save-data", action="store_true", help="also write the pairs (pairs.pt)")
    parser.add_argument("--from-pairs", default=None, help="train from a saved pairs.pt instead of generating")
    parser.set_defaults(func=main, default_train=[str(SHARED_DATA / f) for f in ("gpteacher_roleplay.json", "gpteacher_toolformer.json",
                                                                 "gsm8k_train.json")],
                        default_heldout=[str(SHARED_DATA / "self_instruct_seed_tasks.jsonl")])
