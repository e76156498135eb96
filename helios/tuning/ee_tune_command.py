"""The `helios ee-tune` command: data, tuning, calibration, evaluation, files, report."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from helios.tuning.datasets import sample_requests
from helios.tuning.distill import DistillSet, build_distill_set
from helios.tuning.ee_tune import TuneOptions, calibrate, exit_scores, head_agrees, kl_to_teacher, oracle, simulate, tune
from helios.exits import ExitHead, save_exit_heads

logger = logging.getLogger("helios.tune")


def _split(data: DistillSet) -> tuple[DistillSet, DistillSet]:
    """Halves by continuation (never splitting one answer): calibration and evaluation."""
    calibration = data.sequence_ids % 2 == 0
    return data.subset(calibration.nonzero().squeeze(1)), data.subset((~calibration).nonzero().squeeze(1))


class _Progress:
    def __init__(self, total: int):
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc="training exit heads", unit="tok")

    def __call__(self, n: int) -> None:
        self.bar.update(n)


def run_ee_tune(args) -> int:
    from helios import LLM

    started = time.monotonic()
    exits = sorted(set(args.exits))
    llm = LLM(args.model, kv_cache_memory=args.kv_cache_memory, device=args.device, dtype=args.dtype)
    model = llm.engine.model
    if exits[-1] >= model.arch.num_layers:
        raise ValueError(f"exits must be below the model's {model.arch.num_layers} layers, got {exits}")
    train_prompts = sample_requests(args.dataset, args.num_prompts, llm.tokenizer)
    heldout_prompts = sample_requests(args.heldout, args.heldout_prompts, llm.tokenizer)
    logger.info("self-distillation: %d training prompts from %s, %d held-out prompts from %s",
                len(train_prompts), args.dataset, len(heldout_prompts), args.heldout)
    train = build_distill_set(llm, train_prompts, exits, args.max_tokens)
    heldout = build_distill_set(llm, heldout_prompts, exits, args.max_tokens)
    options = TuneOptions(rank=args.rank, epochs=args.epochs, seed=args.seed)
    raw = [ExitHead(layer, 1.0) for layer in exits]
    kl_before = {h.layer: kl_to_teacher(model, h, heldout) for h in raw}
    heads = tune(model, exits, train, options, _Progress(len(train) * options.epochs * len(exits)))
    report = evaluate(model, raw, heads, heldout, args.targets)
    report["kl_before"], report["kl_after"] = kl_before, {h.layer: kl_to_teacher(model, h, heldout) for h in heads}
    report.update(train_tokens=len(train), heldout_tokens=len(heldout), seconds=time.monotonic() - started,
                  command=args.command_line, datasets={"train": args.dataset, "heldout": args.heldout},
                  options=vars(options))
    default = report["targets"][str(args.targets[0])]
    for head, threshold in zip(heads, default["thresholds"]):
        head.threshold = threshold
    arch = model.arch
    save_exit_heads(args.out, heads, arch.hidden_size, arch.vocab_size, arch.num_layers, confidence="classifier",
                    extra={"calibration": {t: r["thresholds"] for t, r in report["targets"].items()},
                           "default_target": args.targets[0]})
    Path(args.out, "report.json").write_text(json.dumps(report, indent=2))
    _print_summary(report, args.out)
    return 0


def evaluate(model, raw: list[ExitHead], heads: list[ExitHead], heldout: DistillSet, targets: list[float]) -> dict:
    """Calibrate on one half of the held-out rows, measure on the other."""
    calibration, evaluation = _split(heldout)
    layers = [h.layer for h in heads]
    report = {"exits": {}, "targets": {}}
    cal_scores, cal_agrees = exit_scores(model, heads, calibration)
    eval_scores, eval_agrees = exit_scores(model, heads, evaluation)
    for head, raw_head, tuned_agrees in zip(heads, raw, eval_agrees):
        report["exits"][head.layer] = {
            "agreement_raw": float(head_agrees(model, raw_head, evaluation).float().mean()),
            "agreement_tuned": float(tuned_agrees.float().mean()),
        }
    report["oracle"] = oracle(eval_agrees, layers, model.arch.num_layers)
    for target in targets:
        thresholds = calibrate(cal_scores, cal_agrees, target)
        result = simulate(eval_scores, eval_agrees, thresholds, layers, model.arch.num_layers)
        report["targets"][str(target)] = {"thresholds": thresholds, **result}
    return report


def _print_summary(report: dict, out: str) -> None:
    print(f"exit heads written to {out} ({report['train_tokens']} training tokens, {report['seconds']:.0f} s)")
    for layer, row in report["exits"].items():
        print(f"  exit {layer}: agreement {row['agreement_raw']:.2f} raw -> {row['agreement_tuned']:.2f} tuned; "
              f"KL {report['kl_before'][layer]:.2f} -> {report['kl_after'][layer]:.2f}")
    for target, row in report["targets"].items():
        coverage = ", ".join(f"{layer}: {share:.2f}" for layer, share in row["coverage"].items())
        print(f"  target {target}: held-out agreement {row['agreement']:.3f}, mean exit layer "
              f"{row['mean_exit_layer']:.1f}; coverage {coverage}")


def add_arguments(parser) -> None:
    from helios.cli_options import add_engine_arguments, float_list, int_list
    from helios.tuning.datasets import SHARED_DATA

    # the frozen model runs in float32 by default: small adapter updates survive
    add_engine_arguments(parser, only={"model", "kv_cache_memory", "device", "dtype"},
                         defaults={"kv_cache_memory": 512 << 20, "dtype": "float32"})
    parser.add_argument("--exits", type=int_list, default=[6, 12, 18, 24], help="exit layers, e.g. 6,12,18,24")
    parser.add_argument("--dataset", action="append", default=None,
                        help="training prompts (repeat for several files; default: three shared sets)")
    parser.add_argument("--heldout", action="append", default=None,
                        help="held-out prompts for calibration and evaluation (default: shared self-instruct)")
    parser.add_argument("--out", required=True, help="folder for exit_heads.json/.safetensors and report.json")
    parser.add_argument("--num-prompts", type=int, default=192)
    parser.add_argument("--heldout-prompts", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=96, help="tokens per continuation")
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--targets", type=float_list, default=[0.95, 0.98], help="agreement targets; the first is the default")
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(default_train=[str(SHARED_DATA / f) for f in ("gpteacher_roleplay.json",
                                                                      "gpteacher_toolformer.json", "gsm8k_train.json")],
                        default_heldout=[str(SHARED_DATA / "self_instruct_seed_tasks.jsonl")])
