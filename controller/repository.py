"""The model repository: what `helios profile` measured, per candidate and per depth.

One JSON file a user can read and diff (keys sorted, two-space indent, depths and batch sizes
in numeric order). Its shape, with one candidate profiled at two depths (values illustrative):

    {
      "format": "helios-model-repository/1",
      "command": "helios profile slo.yaml --out model-repository.json",
      "machine": "2 CPU cores, 24 GiB, no GPU",
      "reference": "qwen-1.5b",          # candidate whose full-depth output reference_agreement uses
      "settings": {"prompts": 8, "max_tokens": 48, "batch_sizes": [1, 8, 32]},
      "candidates": {
        "smollm2-tuned": {
          "source": "smollm2-135m",
          "num_layers": 30,
          "weight_bytes_shared": 28311552,      # embeddings, final norm, LM head, exit heads
          "weight_bytes_per_layer": [3538944, ...],   # decoder layer i, one entry per layer
          "kv_bytes_per_token_per_layer": 1280,
          "depths": {
            "18": {
              "weight_bytes": 92012544,         # shared + the first 18 layers
              "kv_bytes_per_token": 23040,      # per layer x 18
              "throughput": {"1": 41.2, "8": 160.3, "32": 301.0},   # output tokens/s by batch size
              "ttft_s": 0.05, "ttft_p95_s": 0.08, "tpot_s": 0.024, "tpot_p95_s": 0.03,
              "latency_s": 1.2,                 # mean response time at batch 1
              "exit_distribution": {"6": 0.1, "12": 0.2, "18": 0.7},   # share of tokens by layers run
              "breach_share": 0.55,             # tokens forced out at layer 18 (prefix loads only)
              "agreement": 0.93,                # token agreement with its own full depth
              "reference_agreement": 0.41,      # ... with the reference candidate's full depth
              "task_accuracy": 0.02,            # answers right (GSM8K-style), when the prompts had answers
              "energy_j_per_token": null        # when a power reading existed
            },
            "30": {...}
          }
        }
      }
    }
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from deployments.config import ConfigError, validate

FORMAT = "helios-model-repository/1"
Share = float  # 0 to 1


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DepthProfile(_Strict):
    weight_bytes: int = Field(ge=0)
    kv_bytes_per_token: int = Field(ge=1)
    throughput: dict[int, float] = Field(min_length=1)  # output tokens/s by batch size
    ttft_s: float = Field(ge=0)
    ttft_p95_s: float = Field(ge=0)
    tpot_s: float = Field(ge=0)
    tpot_p95_s: float = Field(ge=0)
    latency_s: float = Field(ge=0)
    exit_distribution: dict[int, Share]
    breach_share: Share = Field(0.0, ge=0, le=1)
    agreement: Share = Field(ge=0, le=1)
    reference_agreement: Share | None = Field(None, ge=0, le=1)
    task_accuracy: Share | None = Field(None, ge=0, le=1)
    energy_j_per_token: float | None = Field(None, ge=0)

    @model_validator(mode="after")
    def _distribution_sums_to_one(self) -> "DepthProfile":
        shares = self.exit_distribution.values()
        if any(s < 0 for s in shares) or (shares and abs(sum(shares) - 1) > 1e-3):
            raise ValueError("exit_distribution shares must be >= 0 and sum to 1")
        return self


class CandidateProfile(_Strict):
    source: str
    num_layers: int = Field(ge=1)
    weight_bytes_shared: int = Field(ge=0)
    weight_bytes_per_layer: list[int]
    kv_bytes_per_token_per_layer: int = Field(ge=1)
    depths: dict[int, DepthProfile] = Field(min_length=1)

    @model_validator(mode="after")
    def _consistent(self) -> "CandidateProfile":
        if len(self.weight_bytes_per_layer) != self.num_layers:
            raise ValueError(f"weight_bytes_per_layer needs {self.num_layers} entries")
        for depth, profile in self.depths.items():
            if not 1 <= depth <= self.num_layers:
                raise ValueError(f"depth {depth} is outside 1..{self.num_layers}")
            if profile.weight_bytes != self.weight_bytes(depth):
                raise ValueError(f"depths.{depth}.weight_bytes is not shared + the first {depth} layers")
            if profile.kv_bytes_per_token != self.kv_bytes_per_token_per_layer * depth:
                raise ValueError(f"depths.{depth}.kv_bytes_per_token is not per layer x {depth}")
            if any(not 1 <= layer <= depth for layer in profile.exit_distribution):
                raise ValueError(f"depths.{depth}.exit_distribution has layers outside 1..{depth}")
        return self

    def weight_bytes(self, depth: int) -> int:
        """Bytes of weights a load of the first `depth` layers holds."""
        return self.weight_bytes_shared + sum(self.weight_bytes_per_layer[:depth])

    def full_exit_distribution(self) -> dict[int, Share]:
        """The exit distribution at the deepest profiled depth: where tokens want to leave when
        nothing forces them out (exact when the full depth was profiled, as `helios profile` does)."""
        return self.depths[max(self.depths)].exit_distribution


class Repository(_Strict):
    format: Literal["helios-model-repository/1"] = FORMAT
    command: str = ""
    machine: str = ""
    reference: str | None = None
    settings: dict[str, int | float | str | list[int]] = Field(default_factory=dict)
    candidates: dict[str, CandidateProfile] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _reference_known(self) -> "Repository":
        if self.reference is not None and self.reference not in self.candidates:
            raise ValueError(f"reference {self.reference!r} is not a candidate")
        return self

    def to_json(self) -> str:
        # python-mode dump keeps int keys, so sort_keys orders depths and batch sizes numerically
        return json.dumps(self.model_dump(), sort_keys=True, indent=2) + "\n"


def parse_repository(data: dict) -> Repository:
    return validate(Repository, data, "model repository")


def load_repository(path: str | Path) -> Repository:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"model repository {path} does not exist (write it with `helios profile`)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is not valid JSON: {exc}") from None
    return parse_repository(data)


def save_repository(repository: Repository, path: str | Path) -> None:
    """Write atomically (a reader never sees half a file)."""
    path = Path(path)
    temporary = path.with_suffix(path.suffix + ".tmp")
    temporary.write_text(repository.to_json())
    temporary.replace(path)
