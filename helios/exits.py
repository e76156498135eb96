"""Exit heads, confidence measures and the exit-head file format.

An exit head after layer ``L`` (``L`` = number of decoder layers run) is an RMS norm and
the model's LM head, optionally with a small low-rank adapter between them and a linear
confidence classifier beside them.

Head folder format (``helios-exit-heads/1``):

- ``exit_heads.json``::

      {"format": "helios-exit-heads/1",
       "model": {"hidden_size": 576, "vocab_size": 49152, "num_layers": 30},
       "confidence": "max_prob",            # default measure for these heads
       "exits": [{"layer": 6, "threshold": 0.9, "adapter_rank": 64, "classifier": true}, ...],
       "calibration": {"0.95": [t6, t12, ...], "0.98": [...]}}   # optional: thresholds per
                                                                  # agreement target, in exit order

- ``exit_heads.safetensors`` with, per exit ``L``: ``exit.L.norm`` [hidden] (optional:
  the final norm is used when absent), ``exit.L.adapter.down`` [rank, hidden] and
  ``exit.L.adapter.up`` [hidden, rank] when ``adapter_rank`` > 0 (the adapter adds
  ``up(silu(down(x)))`` to the normed state), ``exit.L.classifier.weight`` [hidden] and
  ``exit.L.classifier.bias`` [1] when ``classifier`` is true (its score is
  ``sigmoid(w . norm(h) + b)``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from helios.config import EngineConfig
from helios.model import DecoderModel, rms_norm

FORMAT = "helios-exit-heads/1"


class ExitHeadError(ValueError):
    """Exit-head files that cannot be used with this model; the message says why."""


@dataclass
class ExitHead:
    layer: int
    threshold: float
    norm: torch.Tensor | None = None
    adapter_down: torch.Tensor | None = None
    adapter_up: torch.Tensor | None = None
    classifier_weight: torch.Tensor | None = None
    classifier_bias: torch.Tensor | None = None

    def features(self, model: DecoderModel, hidden: torch.Tensor) -> torch.Tensor:
        """The state fed to the LM head."""
        norm = model.norm if self.norm is None else self.norm
        x = rms_norm(hidden, norm, model.arch.rms_norm_eps)
        if self.adapter_down is not None:
            x = x + F.silu(x @ self.adapter_down.T) @ self.adapter_up.T
        return x

    def logits(self, model: DecoderModel, hidden: torch.Tensor) -> torch.Tensor:
        return model.lm_head(self.features(model, hidden)).float()

    def classifier_score(self, model: DecoderModel, hidden: torch.Tensor) -> torch.Tensor:
        if self.classifier_weight is None:
            raise ExitHeadError(f"the exit head at layer {self.layer} has no confidence classifier")
        x = rms_norm(hidden, model.norm if self.norm is None else self.norm, model.arch.rms_norm_eps)
        return torch.sigmoid(x.float() @ self.classifier_weight.float() + self.classifier_bias.float())


def probability_confidence(logits: torch.Tensor, measure: str) -> torch.Tensor:
    """Max softmax probability, or top-1 minus top-2 probability."""
    probs = torch.softmax(logits, dim=-1)
    if measure == "max_prob":
        return probs.max(dim=-1).values
    top2 = probs.topk(2, dim=-1).values
    return top2[:, 0] - top2[:, 1]


def saturation(hidden: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """Cosine of the hidden state between consecutive exit points (1 = it stopped moving)."""
    return F.cosine_similarity(hidden.float(), previous.float(), dim=-1)


def save_exit_heads(folder: str | Path, heads: list[ExitHead], hidden_size: int, vocab_size: int,
                    num_layers: int, confidence: str = "max_prob", extra: dict | None = None) -> None:
    """Write heads in the documented format (the tuning tool and tests use this)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors, entries = {}, []
    for head in heads:
        key = f"exit.{head.layer}."
        if head.norm is not None:
            tensors[key + "norm"] = head.norm
        if head.adapter_down is not None:
            tensors[key + "adapter.down"], tensors[key + "adapter.up"] = head.adapter_down, head.adapter_up
        if head.classifier_weight is not None:
            tensors[key + "classifier.weight"] = head.classifier_weight
            tensors[key + "classifier.bias"] = head.classifier_bias
        entries.append({
            "layer": head.layer,
            "threshold": head.threshold,
            "adapter_rank": 0 if head.adapter_down is None else head.adapter_down.shape[0],
            "classifier": head.classifier_weight is not None,
        })
    meta = {"format": FORMAT, "model": {"hidden_size": hidden_size, "vocab_size": vocab_size,
                                         "num_layers": num_layers}, "confidence": confidence, "exits": entries}
    meta.update(extra or {})
    save_file({k: v.detach().contiguous().cpu().float() for k, v in tensors.items()}, folder / "exit_heads.safetensors")
    (folder / "exit_heads.json").write_text(json.dumps(meta, indent=2))


# tuned heads that ship with Helios, by name (e.g. "smollm2-135m")
SHIPPED_HEADS = Path(__file__).resolve().parent / "exit_heads"


def resolve_exit_heads(reference: str | Path) -> Path:
    """A folder path, or the name of heads shipped in helios/exit_heads/."""
    folder = Path(reference)
    if not folder.is_dir() and (SHIPPED_HEADS / str(reference)).is_dir():
        return SHIPPED_HEADS / str(reference)
    return folder


def load_exit_heads(folder: str | Path, model: DecoderModel) -> tuple[list[ExitHead], dict]:
    """Read heads for `model`; shape or format problems raise ExitHeadError with the reason."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = resolve_exit_heads(folder)
    meta_path, weights_path = folder / "exit_heads.json", folder / "exit_heads.safetensors"
    for path in (meta_path, weights_path):
        if not path.is_file():
            raise ExitHeadError(f"{path} is missing: an exit-head folder holds exit_heads.json and exit_heads.safetensors")
    try:
        meta = json.loads(meta_path.read_text())
        tensors = load_file(weights_path)
    except (json.JSONDecodeError, SafetensorError, OSError) as exc:
        raise ExitHeadError(f"corrupt exit-head files in {folder}: {exc}") from exc
    if meta.get("format") != FORMAT:
        raise ExitHeadError(f"{meta_path}: format {meta.get('format')!r} is not {FORMAT!r}")
    arch = model.arch
    expected = {"hidden_size": arch.hidden_size, "vocab_size": arch.vocab_size, "num_layers": arch.num_layers}
    if meta.get("model") != expected:
        raise ExitHeadError(f"{folder} holds heads for another model: {meta.get('model')} vs this model's {expected}")
    heads = [_head_from_entry(entry, tensors, model) for entry in meta["exits"]]
    return heads, meta


def apply_calibration(heads: list[ExitHead], meta: dict, target: float) -> float:
    """Set the thresholds calibrated for the lowest stored agreement target >= `target`; return it."""
    calibration = {float(t): v for t, v in meta.get("calibration", {}).items()}
    meeting = sorted(t for t in calibration if t >= target - 1e-9)
    if not meeting:
        raise ExitHeadError(f"these heads are calibrated for agreement {sorted(calibration)}; none reaches {target}")
    for head, threshold in zip(heads, calibration[meeting[0]]):
        head.threshold = float(threshold)
    return meeting[0]


def _head_from_entry(entry: dict, tensors: dict, model: DecoderModel) -> ExitHead:
    layer, hidden = int(entry["layer"]), model.arch.hidden_size
    dtype, device = model.embed_tokens.weight.dtype, model.embed_tokens.weight.device

    def tensor(name: str, shape: tuple) -> torch.Tensor:
        key = f"exit.{layer}.{name}"
        if key not in tensors:
            raise ExitHeadError(f"exit_heads.safetensors lacks {key}")
        if tuple(tensors[key].shape) != shape:
            raise ExitHeadError(f"{key} has shape {tuple(tensors[key].shape)}, expected {shape} for this model")
        return tensors[key].to(device=device, dtype=dtype)

    rank = int(entry.get("adapter_rank", 0))
    head = ExitHead(layer=layer, threshold=float(entry["threshold"]))
    if f"exit.{layer}.norm" in tensors:
        head.norm = tensor("norm", (hidden,))
    if rank:
        head.adapter_down, head.adapter_up = tensor("adapter.down", (rank, hidden)), tensor("adapter.up", (hidden, rank))
    if entry.get("classifier"):
        head.classifier_weight, head.classifier_bias = tensor("classifier.weight", (hidden,)), tensor("classifier.bias", (1,))
    return head


def heads_for_config(config: EngineConfig, model: DecoderModel) -> tuple[list[ExitHead], str]:
    """The exit heads an engine config asks for, and the confidence measure they are checked with."""
    if config.exit_heads:
        heads, meta = load_exit_heads(config.exit_heads, model)
        if config.exit_target is not None:
            apply_calibration(heads, meta, config.exit_target)
        return heads, config.confidence or meta.get("confidence", "max_prob")
    for layer in config.exit_layers:
        if layer > model.arch.num_layers:
            raise ValueError(f"exit layer {layer} is past the model's {model.arch.num_layers} layers")
    heads = [ExitHead(layer, config.exit_threshold) for layer in sorted(set(config.exit_layers))]
    return heads, config.confidence or "max_prob"
