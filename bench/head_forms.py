"""Which exit-head form agrees best with full depth? Low-rank adapters against a copy of a
decoder layer's MLP block (EE-Tuning's richer heads), trained the same way on one cached
self-distillation set and scored on held-out prompts.

    python bench/head_forms.py --json bench/results/exit_head_forms.json

Forms: `adapterR` = tuned norm + rank-R adapter + the shared LM head (what `helios ee-tune`
trains); `mlp_next` / `mlp_last` = h + MLP(h) with the MLP block (its norm, gate/up and down
projections) copied from the next decoder layer / the last one, then the final norm and the
shared LM head, all of it trained with KL to the final layer. For each form: held-out
agreement per exit, the oracle mean exit layer (each token leaves at the first exit whose
head agrees), and the mean exit layer the linear confidence classifier reaches when
calibrated to each agreement target (calibrated on one half of the held-out prompts,
measured on the other).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
import torch.nn.functional as F

from helios import LLM
from helios.tuning.datasets import SHARED_DATA, sample_requests
from helios.tuning.distill import DistillSet, build_distill_set
from helios.tuning.ee_tune import TuneOptions, calibrate, fit_kl, head_agrees, oracle, simulate, train_classifier, train_head
from helios.tuning.ee_tune_command import _split
from helios.exits import ExitHead
from helios.model import DecoderModel, rms_norm


class MLPHead(torch.nn.Module):
    """h + MLP(norm(h)) with a decoder layer's MLP block as the start, then the final norm."""

    def __init__(self, model: DecoderModel, source_layer: int):
        super().__init__()
        layer = model.layers[source_layer]
        self.model = model
        self.post_norm = torch.nn.Parameter(layer.post_norm.detach().float().clone())
        self.gate_up = torch.nn.Parameter(layer.gate_up_proj.weight.detach().float().clone())
        self.down = torch.nn.Parameter(layer.down_proj.weight.detach().float().clone())
        self.norm = torch.nn.Parameter(model.norm.detach().float().clone())

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        eps = self.model.arch.rms_norm_eps
        gate, up = F.linear(rms_norm(hidden, self.post_norm, eps), self.gate_up).chunk(2, dim=-1)
        out = hidden + F.linear(F.silu(gate) * up, self.down)
        return F.linear(rms_norm(out, self.norm, eps), self.model.lm_head.weight.detach().float())


def train_mlp_head(model: DecoderModel, layer: int, source_layer: int, data: DistillSet, epochs: int,
                   lr: float) -> MLPHead:
    head = MLPHead(model, source_layer)
    fit_kl(model, head.logits, list(head.parameters()), data.hidden[layer], data, TuneOptions(epochs=epochs, lr=lr),
           torch.Generator().manual_seed(layer))
    return head


def mlp_agrees(head: MLPHead, layer: int, data: DistillSet) -> torch.Tensor:
    with torch.no_grad():
        return head.logits(data.hidden[layer]).argmax(-1) == data.tokens


def probe_scores(model: DecoderModel, layer: int, agrees: torch.Tensor, train: DistillSet,
                 parts: list[DistillSet]) -> list[torch.Tensor]:
    """The product's linear confidence classifier (on the final-normed state) for a head whose
    per-row agreement on `train` is `agrees`; its scores on each of `parts`."""
    probe = ExitHead(layer, 1.0, norm=model.norm.detach().float())
    train_classifier(model, probe, train, TuneOptions(), labels=agrees)
    with torch.no_grad():
        return [probe.classifier_score(model, part.hidden[layer]) for part in parts]


def measure_form(model: DecoderModel, form: str, exits: list[int], train: DistillSet, heldout: DistillSet,
                 args) -> dict:
    started = time.monotonic()
    calibration, evaluation = _split(heldout)
    agree_cal, agree_eval, score_cal, score_eval = [], [], [], []
    for layer in exits:
        if form.startswith("adapter"):
            head = train_head(model, layer, train, TuneOptions(rank=int(form[len("adapter"):]), epochs=args.epochs))
            agrees = [head_agrees(model, head, part) for part in (train, calibration, evaluation)]
        else:
            source = layer if form == "mlp_next" else model.arch.num_layers - 1
            head = train_mlp_head(model, layer, source, train, args.epochs, args.mlp_lr)
            agrees = [mlp_agrees(head, layer, part) for part in (train, calibration, evaluation)]
        scores = probe_scores(model, layer, agrees[0], train, [calibration, evaluation])
        agree_cal.append(agrees[1])
        agree_eval.append(agrees[2])
        score_cal.append(scores[0])
        score_eval.append(scores[1])
        print(f"{form} exit {layer}: agreement {agrees[0].float().mean():.3f} on training rows, "
              f"{agrees[2].float().mean():.3f} held out", flush=True)
    agree_cal, agree_eval, score_cal, score_eval = map(torch.stack, (agree_cal, agree_eval, score_cal, score_eval))
    num_layers = model.arch.num_layers
    row = {"agreement": dict(zip(exits, (float(a.float().mean()) for a in agree_eval))),
           "oracle_mean_exit_layer": oracle(agree_eval, exits, num_layers)["mean_exit_layer"], "targets": {}}
    for target in args.targets:
        result = simulate(score_eval, agree_eval, calibrate(score_cal, agree_cal, target), exits, num_layers)
        row["targets"][str(target)] = {"agreement": result["agreement"], "mean_exit_layer": result["mean_exit_layer"]}
    row["seconds"] = time.monotonic() - started
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--exits", default="6,12,18,24")
    parser.add_argument("--forms", default="adapter64,adapter256,mlp_next,mlp_last")
    parser.add_argument("--num-prompts", type=int, default=128, help="training prompts (three shared sets)")
    parser.add_argument("--heldout-prompts", type=int, default=48, help="held-out self-instruct prompts")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--mlp-lr", type=float, default=TuneOptions.lr, help="for the MLP heads (adapters: ee-tune's)")
    parser.add_argument("--targets", default="0.95,0.9,0.8")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    args.targets = [float(t) for t in args.targets.split(",")]
    exits = [int(e) for e in args.exits.split(",")]
    torch.manual_seed(0)
    llm = LLM(args.model, dtype="float32", linear_kernel="torch")  # reads the layers' plain weights
    model = llm.engine.model
    files = [str(SHARED_DATA / f) for f in ("gpteacher_roleplay.json", "gpteacher_toolformer.json", "gsm8k_train.json")]
    train = build_distill_set(llm, sample_requests(files, args.num_prompts, llm.tokenizer), exits, args.max_tokens)
    heldout_files = [str(SHARED_DATA / "self_instruct_seed_tasks.jsonl")]
    heldout = build_distill_set(llm, sample_requests(heldout_files, args.heldout_prompts, llm.tokenizer), exits,
                                args.max_tokens)
    results = {"command": "python " + " ".join(sys.argv), "train_tokens": len(train), "heldout_tokens": len(heldout), "forms": {}}
    for form in args.forms.split(","):
        results["forms"][form] = measure_form(model, form, exits, train, heldout, args)
        print(form, json.dumps(results["forms"][form]), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
