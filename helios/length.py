"""Response-length prediction: a small head on the prompt's last hidden state, run inside prefill.

The runner keeps the hidden state of each row that samples a request's first token at the
head's layers (the state it computes anyway), and the head maps them to a predicted number
of output tokens: no extra forward pass. Policies (helios/policies.py) read the prediction
from `Sequence.predicted_length`.

Features: per layer, the state RMS-normalised without a learned weight (scale-free across
layers), concatenated, then standardised with the training set's mean and std.
Model: one hidden layer (ReLU), two outputs read off it:

- ``buckets``: logits over length buckets [edges[i], edges[i+1]) (cross-entropy);
- ``score``: the predicted length divided by ``cap`` (L1 loss, so it estimates the median):
  the rank score policies sort by, and times ``cap`` the predicted length.

Head folder format (``helios-length-head/1``):

- ``length_head.json``::

      {"format": "helios-length-head/1",
       "model": {"hidden_size": 576, "num_layers": 30},
       "layers": [15, 30],          # layers run when the state is taken (30 = the last)
       "hidden": 256,               # width of the hidden layer
       "cap": 512,                  # max_tokens of the training generations: predictions are <= cap
       "bucket_edges": [0, 32, 64, ..., 512],
       "label": "max_of_4"}         # what was predicted (greedy | max_of_N sampled generations)

- ``length_head.safetensors``: ``mean`` and ``std`` [F] (F = hidden_size x len(layers)),
  ``fc1.weight`` [hidden, F], ``fc1.bias`` [hidden], ``buckets.weight`` [B, hidden],
  ``buckets.bias`` [B], ``score.weight`` [1, hidden], ``score.bias`` [1].
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

FORMAT = "helios-length-head/1"
# heads that ship with Helios, by model name (e.g. "smollm2-135m")
SHIPPED_HEADS = Path(__file__).resolve().parent / "length_heads"


class LengthHeadError(ValueError):
    """Length-head files that cannot be used with this model; the message says why."""


def length_features(states: list[torch.Tensor], eps: float = 1e-6) -> torch.Tensor:
    """[N, hidden] states at each head layer -> [N, hidden x layers] float32 features."""
    normed = [s.float() * torch.rsqrt(s.float().pow(2).mean(-1, keepdim=True) + eps) for s in states]
    return torch.cat(normed, dim=-1)


@dataclass
class LengthHeadSpec:
    hidden_size: int
    num_layers: int
    layers: list[int]
    cap: int
    hidden: int = 256
    bucket_edges: list[int] = field(default_factory=list)
    label: str = "greedy"

    def __post_init__(self) -> None:
        if not self.bucket_edges:
            step = max(1, self.cap // 16)
            self.bucket_edges = list(range(0, self.cap, step)) + [self.cap]


class LengthHead(nn.Module):
    def __init__(self, spec: LengthHeadSpec):
        super().__init__()
        self.spec = spec
        num_features = spec.hidden_size * len(spec.layers)
        self.register_buffer("mean", torch.zeros(num_features))
        self.register_buffer("std", torch.ones(num_features))
        self.fc1 = nn.Linear(num_features, spec.hidden)
        self.buckets = nn.Linear(spec.hidden, len(spec.bucket_edges) - 1)
        self.score = nn.Linear(spec.hidden, 1)

    @property
    def layers(self) -> list[int]:
        return self.spec.layers

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """features [N, F] -> (bucket logits [N, B], score [N]: predicted length / cap)."""
        x = F.relu(self.fc1((features.float() - self.mean) / self.std))
        return self.buckets(x), self.score(x).squeeze(-1)

    @torch.inference_mode()
    def predict(self, states: list[torch.Tensor]) -> list[int]:
        """Predicted output tokens (1..cap) from the states at `layers`, one per row."""
        _, score = self(length_features(states))
        return (score * self.spec.cap).round().clamp(1, self.spec.cap).long().tolist()


def save_length_head(folder: str | Path, head: LengthHead, extra: dict | None = None) -> None:
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    spec = head.spec
    meta = {"format": FORMAT, "model": {"hidden_size": spec.hidden_size, "num_layers": spec.num_layers},
            "layers": spec.layers, "hidden": spec.hidden, "cap": spec.cap, "bucket_edges": spec.bucket_edges,
            "label": spec.label, **(extra or {})}
    tensors = {k: v.detach().float().contiguous().cpu() for k, v in head.state_dict().items()}
    save_file(tensors, folder / "length_head.safetensors")
    (folder / "length_head.json").write_text(json.dumps(meta, indent=2))


def resolve_length_head(reference: str | Path) -> Path:
    """A folder path, or the name of a head shipped in helios/length_heads/."""
    folder = Path(reference)
    if not folder.is_dir() and (SHIPPED_HEADS / str(reference)).is_dir():
        return SHIPPED_HEADS / str(reference)
    return folder


def load_length_head(reference: str | Path, hidden_size: int | None = None,
                     num_layers: int | None = None) -> LengthHead:
    """Read a head; with the model's sizes given, refuse one made for another model."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = resolve_length_head(reference)
    meta_path, weights_path = folder / "length_head.json", folder / "length_head.safetensors"
    for path in (meta_path, weights_path):
        if not path.is_file():
            raise LengthHeadError(f"{path} is missing: a length-head folder holds length_head.json and "
                                  "length_head.safetensors")
    try:
        meta = json.loads(meta_path.read_text())
        tensors = load_file(weights_path)
    except (json.JSONDecodeError, SafetensorError, OSError) as exc:
        raise LengthHeadError(f"corrupt length-head files in {folder}: {exc}") from exc
    if meta.get("format") != FORMAT:
        raise LengthHeadError(f"{meta_path}: format {meta.get('format')!r} is not {FORMAT!r}")
    model = meta["model"]
    if hidden_size is not None and (model["hidden_size"], model["num_layers"]) != (hidden_size, num_layers):
        raise LengthHeadError(f"{folder} holds a head for another model: {model} vs hidden_size {hidden_size}, "
                              f"num_layers {num_layers}")
    spec = LengthHeadSpec(model["hidden_size"], model["num_layers"], [int(x) for x in meta["layers"]],
                          int(meta["cap"]), int(meta["hidden"]), [int(x) for x in meta["bucket_edges"]],
                          meta.get("label", "greedy"))
    head = LengthHead(spec)
    try:
        head.load_state_dict(tensors)
    except RuntimeError as exc:
        raise LengthHeadError(f"{weights_path}: {exc}") from exc
    return head.eval()
