"""`helios length-tune`: (prompt, response length) pairs from the engine itself, then a length head.

1. Data: every prompt runs once greedy and `num_samples` times sampled, in one batch through
   the engine; the engine's length recorder keeps the prefill states at the head's layers
   (the states the serving engine will feed the head), so no extra pass runs. Labels: the
   greedy length, and the paper's label, the max over the sampled generations (Zheng et al.
   2023 take the max of several samples so that a group's batch rarely outruns it).
   Lengths are capped at `max_tokens`: a prediction never exceeds the cap, and errors on
   answers longer than the cap are not seen.
2. Training: the head of helios/length.py, cross-entropy on the length bucket plus L1 on
   length / cap (the score: L1 estimates the median, which minimises the absolute error),
   AdamW with weight decay, the epoch kept that scores best on a validation tenth.
3. Evaluation on held-out prompts: mean absolute error, share within 50 and 100 tokens,
   Spearman rank correlation, bucket accuracy; against the training median as a baseline.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from helios.length import LengthHead, LengthHeadSpec, length_features
from helios.sampling_params import SamplingParams


@dataclass
class LengthData:
    features: torch.Tensor  # [N, F] float32 (helios.length.length_features of the prefill states)
    greedy: torch.Tensor  # [N] output tokens of the greedy generation
    sampled: torch.Tensor  # [N, S] output tokens of each sampled generation

    def labels(self, label: str) -> torch.Tensor:
        if label == "greedy" or self.sampled.shape[1] == 0:
            return self.greedy.float()
        return self.sampled.max(dim=1).values.float()  # the paper's label: max over samples


@dataclass
class TrainOptions:
    # small and strongly regularised: a few hundred pairs of 1,152 features overfit a wider head
    # (on 180 pairs of the default model, hidden 16 / decay 1.0 beat 128 / 0.05 on held-out MAE)
    hidden: int = 16
    epochs: int = 300
    lr: float = 3e-4
    weight_decay: float = 1.0
    bucket_weight: float = 0.2  # cross-entropy weight beside the L1 on length / cap
    seed: int = 0


def collect(llm, prompts: list, layers: list[int], max_tokens: int, num_samples: int, temperature: float = 0.8,
            seed: int = 0, progress=None) -> LengthData:
    """Greedy and sampled generations of every prompt, and the prefill states at `layers`."""
    engine = engine_of(llm)
    engine.runner.capture_layers = frozenset(layers)
    states: dict[str, torch.Tensor] = {}

    def record(seqs, layer_states):
        feats = length_features([layer_states[layer] for layer in layers])
        for row, seq in enumerate(seqs):
            states.setdefault(seq.request_id.split(":")[0], feats[row].cpu())

    engine.length_recorder = record
    lengths: dict[str, int] = {}
    try:
        for i, prompt in enumerate(prompts):
            engine.add_request(prompt, SamplingParams(max_tokens=max_tokens, temperature=0), f"{i}:g")
            for k in range(num_samples):
                params = SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed + 1000 * i + k)
                engine.add_request(prompt, params, f"{i}:s{k}")
        while engine.has_unfinished():
            for out in engine.step():
                if out.finished:
                    lengths[out.request_id] = out.num_output_tokens
                    if progress is not None:
                        progress(1)
    finally:
        engine.length_recorder, engine.runner.capture_layers = None, frozenset()
    n = len(prompts)
    return LengthData(torch.stack([states[str(i)] for i in range(n)]),
                      torch.tensor([lengths[f"{i}:g"] for i in range(n)]),
                      torch.tensor([[lengths[f"{i}:s{k}"] for k in range(num_samples)] for i in range(n)],
                                   dtype=torch.long).view(n, num_samples))


def engine_of(llm):
    return getattr(llm, "engine", llm)


def _bucket_of(lengths: torch.Tensor, edges: list[int]) -> torch.Tensor:
    inner = torch.tensor(edges[1:-1], dtype=lengths.dtype)
    return torch.bucketize(lengths, inner, right=True)


def train_head(features: torch.Tensor, labels: torch.Tensor, spec: LengthHeadSpec,
               options: TrainOptions) -> tuple[LengthHead, dict]:
    """Fit a head; the epoch with the lowest validation MAE (a tenth of the rows) is kept."""
    torch.manual_seed(options.seed)
    generator = torch.Generator().manual_seed(options.seed)
    order = torch.randperm(len(labels), generator=generator)
    num_val = max(1, len(labels) // 10)
    val, train = order[:num_val], order[num_val:]
    head = LengthHead(spec)
    with torch.no_grad():
        head.mean.copy_(features[train].mean(0))
        head.std.copy_(features[train].std(0).clamp_min(1e-3))
        head.score.bias.fill_(float(labels[train].median()) / spec.cap)  # start at the median
    target_buckets = _bucket_of(labels.long(), spec.bucket_edges)
    optimizer = torch.optim.AdamW(head.parameters(), lr=options.lr, weight_decay=options.weight_decay)
    best, best_mae, history = copy.deepcopy(head.state_dict()), float("inf"), []
    for epoch in range(options.epochs):
        head.train()
        bucket_logits, score = head(features[train])
        loss = (F.l1_loss(score, labels[train] / spec.cap)
                + options.bucket_weight * F.cross_entropy(bucket_logits, target_buckets[train]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        head.eval()
        mae = _mae(head, features[val], labels[val])
        history.append(mae)
        if mae < best_mae:
            best, best_mae = copy.deepcopy(head.state_dict()), mae
    head.load_state_dict(best)
    return head.eval(), {"validation_mae": best_mae, "best_epoch": history.index(best_mae) + 1,
                         "train_rows": len(train), "validation_rows": num_val}


def predict_features(head: LengthHead, features: torch.Tensor) -> torch.Tensor:
    """Predictions from already-computed features (length_features of the states)."""
    with torch.inference_mode():
        _, score = head(features)
    return (score * head.spec.cap).round().clamp(1, head.spec.cap)


def _mae(head: LengthHead, features: torch.Tensor, labels: torch.Tensor) -> float:
    return float((predict_features(head, features) - labels).abs().mean())


def _average_ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks 1..n, ties sharing their mean rank (capped lengths tie often)."""
    values, inverse, counts = torch.unique(x, return_inverse=True, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts  # rank - 1 of each value's first row
    return (starts + (counts + 1) / 2.0)[inverse]


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation: Pearson's of the average ranks (0 when either is constant)."""
    ra, rb = _average_ranks(a.float()), _average_ranks(b.float())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / denominator if denominator else 0.0


def error_report(predicted: torch.Tensor, actual: torch.Tensor) -> dict:
    error = (predicted.float() - actual.float()).abs()
    return {"mae": float(error.mean()), "within_50": float((error <= 50).float().mean()),
            "within_100": float((error <= 100).float().mean()), "spearman": spearman(predicted.float(), actual.float()),
            "rows": len(actual)}


def evaluate(head: LengthHead, data: LengthData, train_median: float) -> dict:
    """The head against each label, and the constant training median as a baseline."""
    predicted = predict_features(head, data.features)
    edges = head.spec.bucket_edges
    with torch.inference_mode():
        bucket_logits, _ = head(data.features)
    report = {}
    for label in ("greedy", "max"):
        actual = data.labels(label)
        report[label] = {**error_report(predicted, actual),
                         "bucket_accuracy": float((bucket_logits.argmax(-1) == _bucket_of(actual.long(), edges))
                                                  .float().mean()),
                         "baseline_median": error_report(torch.full_like(actual, train_median), actual)}
    return report


def head_cost(head: LengthHead, hidden_size: int, repeats: int = 200) -> dict:
    """Seconds per request of the head (features + MLP on one row, and per row in a batch of 64)."""
    def timed(rows: int) -> float:
        states = [torch.randn(rows, hidden_size) for _ in head.layers]
        head.predict(states)
        start = time.perf_counter()
        for _ in range(repeats):
            head.predict(states)
        return (time.perf_counter() - start) / repeats
    return {"seconds_one_request": timed(1), "seconds_per_request_in_64": timed(64) / 64}
