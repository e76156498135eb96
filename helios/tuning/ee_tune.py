"""`helios ee-tune`: train exit heads on a frozen backbone, then calibrate their thresholds.

1. Self-distillation (helios/distill.py): the model's own greedy continuations; the hidden
   states at the exit layers are cached once.
2. Per exit, a head = RMS norm + low-rank adapter + the shared (frozen) LM head, trained
   with KL divergence to the final layer's distribution (EE-Tuning's recipe: backbone frozen).
   The adapter's up-projection starts at zero, so training starts from the raw exit.
3. Per exit, a linear confidence classifier on the normed hidden state predicts whether the
   head's token equals the final token (binary cross-entropy). An exit check then costs a
   dot product instead of an LM head over the whole vocabulary.
4. Calibration on held-out prompts: exits are visited in order; at each, among tokens that
   have not exited yet, the threshold is the lowest classifier score at which the tokens
   that would exit agree with the final token at least `target` of the time (empirical
   precision per exit, in the spirit of CALM's calibration; no statistical guarantee).
   Every exiting group then agrees at >= target and the rest run to full depth, so overall
   agreement on the calibration prompts is >= target by construction.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from helios.tuning.distill import DistillSet
from helios.exits import ExitHead
from helios.model import DecoderModel, rms_norm

logger = logging.getLogger("helios.tune")


@dataclass
class TuneOptions:
    rank: int = 64
    epochs: int = 4
    batch_size: int = 256
    lr: float = 1e-3
    classifier_epochs: int = 20
    seed: int = 0


def _on(model: DecoderModel, x: torch.Tensor) -> torch.Tensor:
    """A cached batch moved to the model's device and dtype (GPU tuning keeps the cache on the host)."""
    weight = model.lm_head.weight
    return x.to(device=weight.device, dtype=weight.dtype)


def _logits(model: DecoderModel, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, model.lm_head.weight.float())


def head_logits(model: DecoderModel, norm: torch.Tensor, down: torch.Tensor | None, up: torch.Tensor | None,
                hidden: torch.Tensor) -> torch.Tensor:
    x = rms_norm(hidden, norm, model.arch.rms_norm_eps)
    if down is not None:
        x = x + F.silu(x @ down.T) @ up.T
    return _logits(model, x)


def teacher_log_probs(model: DecoderModel, final: torch.Tensor) -> torch.Tensor:
    return F.log_softmax(_logits(model, rms_norm(final, model.norm.float(), model.arch.rms_norm_eps)), dim=-1)


def kl_to_teacher(model: DecoderModel, head: ExitHead, data: DistillSet, batch_size: int = 512) -> float:
    """Mean KL(final || exit head) over `data`: what training lowers."""
    total = 0.0
    with torch.no_grad():
        for start in range(0, len(data), batch_size):
            rows = slice(start, start + batch_size)
            student = F.log_softmax(head.logits(model, _on(model, data.hidden[head.layer][rows])), -1)
            teacher = teacher_log_probs(model, _on(model, data.final[rows]).float())
            total += F.kl_div(student, teacher, log_target=True, reduction="sum").item()
    return total / max(1, len(data))


def train_head(model: DecoderModel, layer: int, data: DistillSet, options: TuneOptions, progress=None) -> ExitHead:
    """Norm + low-rank adapter for one exit, trained with KL to the final distribution."""
    generator = torch.Generator().manual_seed(options.seed + layer)
    hidden_size, device = model.arch.hidden_size, model.lm_head.weight.device
    norm = model.norm.detach().float().clone().requires_grad_(True)
    down = (torch.randn(options.rank, hidden_size, generator=generator) / hidden_size ** 0.5).to(device)
    down.requires_grad_(True)
    up = torch.zeros(hidden_size, options.rank, device=device, requires_grad=True)
    fit_kl(model, lambda hidden: head_logits(model, norm, down, up, hidden), [norm, down, up], data.hidden[layer],
           data, options, generator, progress)
    return ExitHead(layer, threshold=1.0, norm=norm.detach(), adapter_down=down.detach(), adapter_up=up.detach())


def fit_kl(model: DecoderModel, student_logits, params: list, states: torch.Tensor, data: DistillSet,
           options: TuneOptions, generator: torch.Generator, progress=None) -> None:
    """Train `params` so that `student_logits(exit states)` matches the final layer's distribution
    (KL, AdamW, `options.epochs` passes in `generator`'s order)."""
    device = model.lm_head.weight.device
    optimizer = torch.optim.AdamW(params, lr=options.lr, weight_decay=0.0)
    for epoch in range(options.epochs):
        order = torch.randperm(len(data), generator=generator)
        for start in range(0, len(data), options.batch_size):
            rows = order[start:start + options.batch_size]
            with torch.no_grad():
                teacher = teacher_log_probs(model, data.final[rows].to(device))
            student = F.log_softmax(student_logits(states[rows].to(device)), dim=-1)
            loss = F.kl_div(student, teacher, log_target=True, reduction="batchmean")
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if progress is not None:
                progress(len(rows))


def head_agrees(model: DecoderModel, head: ExitHead, data: DistillSet, batch_size: int = 1024) -> torch.Tensor:
    """Per row: does the head's top token equal the final token?"""
    hits = []
    with torch.no_grad():
        for start in range(0, len(data), batch_size):
            rows = slice(start, start + batch_size)
            logits = head.logits(model, _on(model, data.hidden[head.layer][rows]))
            hits.append(logits.argmax(-1).cpu() == data.tokens[rows])
    return torch.cat(hits)


def train_classifier(model: DecoderModel, head: ExitHead, data: DistillSet, options: TuneOptions,
                     labels: torch.Tensor | None = None) -> None:
    """A linear probe on the normed state predicting agreement (of `head`, unless `labels` gives
    it per row); stored on `head`."""
    labels = (head_agrees(model, head, data) if labels is None else labels).float()
    features = rms_norm(data.hidden[head.layer], head.norm.float().cpu(), model.arch.rms_norm_eps)
    weight = torch.zeros(features.shape[1], requires_grad=True)
    bias = torch.zeros(1, requires_grad=True)
    positive = labels.mean().clamp(1e-3, 1 - 1e-3)
    with torch.no_grad():
        bias.fill_(torch.log(positive / (1 - positive)).item())  # start at the base rate
    optimizer = torch.optim.Adam([weight, bias], lr=1e-2)
    generator = torch.Generator().manual_seed(options.seed)
    for _ in range(options.classifier_epochs):
        order = torch.randperm(len(labels), generator=generator)
        for start in range(0, len(labels), 1024):
            rows = order[start:start + 1024]
            loss = F.binary_cross_entropy_with_logits(features[rows] @ weight + bias, labels[rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    device = model.lm_head.weight.device
    head.classifier_weight, head.classifier_bias = weight.detach().to(device), bias.detach().to(device)


def exit_scores(model: DecoderModel, heads: list[ExitHead], data: DistillSet) -> tuple[torch.Tensor, torch.Tensor]:
    """[exits, N] classifier scores and head-agrees-with-final flags."""
    scores, agrees = [], []
    with torch.no_grad():
        for head in heads:
            scores.append(head.classifier_score(model, _on(model, data.hidden[head.layer])).cpu())
            agrees.append(head_agrees(model, head, data))
    return torch.stack(scores), torch.stack(agrees)


def calibrate(scores: torch.Tensor, agrees: torch.Tensor, target: float) -> list[float]:
    """Per-exit thresholds (in exit order) such that each exiting group agrees >= target."""
    alive = torch.ones(scores.shape[1], dtype=torch.bool)
    thresholds = []
    for score, agree in zip(scores, agrees):
        candidates = score[alive]
        ordered = torch.sort(candidates, descending=True)
        hits = agree[alive][ordered.indices].float().cumsum(0)
        precision = hits / torch.arange(1, len(hits) + 1)
        ok = (precision >= target).nonzero()
        # the lowest score whose top group still meets the target; 1.01 (never) when none does
        threshold = float(ordered.values[ok[-1, 0]]) if len(ok) else 1.01
        thresholds.append(threshold)
        alive &= ~(score >= threshold)
    return thresholds


def simulate(scores: torch.Tensor, agrees: torch.Tensor, thresholds: list[float], layers: list[int],
             num_layers: int) -> dict:
    """Token policy on teacher-forced rows: agreement, mean exit layer and each exit's coverage."""
    alive = torch.ones(scores.shape[1], dtype=torch.bool)
    correct = torch.zeros(scores.shape[1], dtype=torch.bool)
    exit_layer = torch.full((scores.shape[1],), float(num_layers))
    coverage = {}
    for score, agree, threshold, layer in zip(scores, agrees, thresholds, layers):
        leaving = alive & (score >= threshold)
        correct |= leaving & agree
        exit_layer[leaving] = layer
        coverage[layer] = float(leaving.float().mean())
        alive &= ~leaving
    correct |= alive  # full depth agrees with itself
    coverage[num_layers] = float(alive.float().mean())
    return {"agreement": float(correct.float().mean()), "mean_exit_layer": float(exit_layer.mean()),
            "coverage": coverage}


def oracle(agrees: torch.Tensor, layers: list[int], num_layers: int) -> dict:
    """The best any confidence measure could do with these heads: each token exits at the first
    exit whose head agrees with the final token (agreement 1.0)."""
    exit_layer = torch.full((agrees.shape[1],), float(num_layers))
    for agree, layer in reversed(list(zip(agrees, layers))):
        exit_layer[agree] = layer
    coverage = {layer: float((exit_layer == layer).float().mean()) for layer in layers + [num_layers]}
    return {"mean_exit_layer": float(exit_layer.mean()), "coverage": coverage}


def tune(model: DecoderModel, exits: list[int], train: DistillSet, options: TuneOptions,
         progress=None) -> list[ExitHead]:
    heads = []
    for layer in exits:
        started = time.monotonic()
        head = train_head(model, layer, train, options, progress)
        train_classifier(model, head, train, options)
        heads.append(head)
        logger.info("exit %d trained in %.0f s", layer, time.monotonic() - started)
    return heads
