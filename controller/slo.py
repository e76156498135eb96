"""The SLO file: what to serve, for which objective, under which constraints.

One YAML file, validated here (controller/configs/example-slo.yaml documents every key).
Candidates reuse the serving config's model entry (deployments.config.ModelConfig: source,
engine options such as exit heads/policy/target, num_cpus, num_gpus, queue limits) and add the
layer counts the controller may load. Unknown keys and bad values fail with the key path,
through the serving config's ConfigError.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from deployments.config import HTTPConfig, IngressConfig, ModelConfig, parse_size, read_yaml_mapping, validate

OBJECTIVES = ("throughput", "latency", "energy", "memory")
Objective = Literal["throughput", "latency", "energy", "memory"]
QualityProxy = Literal["reference_agreement", "task_accuracy"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Candidate(ModelConfig):
    """A model the controller may serve: a serving model entry plus the depths it may load.

    `id` names the candidate in the repository and the history; clients never see it (they send
    the SLO's public `model`). The depth and the KV cache size are the controller's to set.
    """

    id: str = Field(min_length=1, pattern=r"^[A-Za-z0-9._\-/:]+$")  # required: names it in the repository
    depths: list[int] = Field(min_length=1)  # layer counts it may load, e.g. [12, 18, 24, 30]

    @field_validator("depths")
    @classmethod
    def _depths_ascending(cls, depths: list[int]) -> list[int]:
        if any(d < 1 for d in depths):
            raise ValueError(f"depths count decoder layers and start at 1, got {depths}")
        if len(set(depths)) != len(depths):
            raise ValueError(f"depths must not repeat, got {depths}")
        return sorted(depths)

    @model_validator(mode="before")
    @classmethod
    def _controller_owned(cls, data: Any) -> Any:
        engine = data.get("engine") if isinstance(data, dict) else None
        for key in ("max_layers", "kv_cache_memory"):
            if isinstance(engine, dict) and key in engine:
                raise ValueError(f"engine.{key} is set by the controller (from depths and memory_budget)")
        return data


class Constraints(_Strict):
    # floor on the model-choice proxy (`quality_proxy`) of the chosen candidate at its depth
    min_quality: float = Field(0.0, ge=0, le=1)
    # floor on the depth-choice proxy: token agreement of a prefix load with its own full depth
    min_agreement: float = Field(0.9, ge=0, le=1)
    quality_proxy: QualityProxy = "reference_agreement"
    p95_ttft_s: float | None = Field(None, gt=0)
    p95_tpot_s: float | None = Field(None, gt=0)


class BreachWindow(_Strict):
    tokens: int = Field(100, ge=1)  # the last this many generated tokens
    limit: int = Field(50, ge=0)  # more confidence breaches than this among them triggers a reassessment


class Hysteresis(_Strict):
    # a change made for a better objective (not for safety) must promise at least this ratio
    min_gain: float = Field(1.1, ge=1.0)
    # ... be the best option at this many reassessments in a row
    stable_reassessments: int = Field(2, ge=1)
    # ... and come at least this many requests after the previous change
    min_requests_between_changes: int = Field(150, ge=0)


class ApplyRetry(_Strict):
    """A redeploy that fails (a replica that does not load, a transient Serve error) is tried again,
    waiting first_delay_s, then twice as long each time up to max_delay_s, `attempts` tries in all;
    a newer decision replaces the retry."""

    attempts: int = Field(5, ge=1)  # deploy calls per target, the first included (1: no retry)
    first_delay_s: float = Field(5.0, gt=0)
    max_delay_s: float = Field(60.0, gt=0)

    def delay(self, failures: int) -> float:
        """Seconds to wait after the `failures`-th failed attempt at a target."""
        return min(self.first_delay_s * 2 ** (failures - 1), self.max_delay_s)


class AdminConfig(_Strict):
    enabled: bool = False  # the performance history and decisions over HTTP; off by default
    route_prefix: str = Field("/admin", pattern=r"^/[A-Za-z0-9._\-/]*$")


class SLOConfig(_Strict):
    model: str = Field(min_length=1, pattern=r"^[A-Za-z0-9._\-/:]+$")  # the public name clients send
    candidates: list[Candidate] = Field(min_length=1)
    objective: Objective = "throughput"
    constraints: Constraints = Field(default_factory=Constraints)
    memory_budget: int = Field(gt=0)  # bytes per replica: loaded prefix weights + KV cache
    tokens_per_sequence: int = Field(512, ge=1)  # prompt + output a typical request holds (batch sizing)
    shortlist_size: int = Field(3, ge=1)
    profiling_prompts: int = Field(5, ge=1)  # live prompts mirrored to each shortlisted candidate
    reassess_every: int = Field(150, ge=1)  # finished requests between reassessments
    breach_window: BreachWindow = Field(default_factory=BreachWindow)
    hysteresis: Hysteresis = Field(default_factory=Hysteresis)
    apply_retry: ApplyRetry = Field(default_factory=ApplyRetry)
    # files; relative paths are taken from the SLO file's folder
    repository: str = "model-repository.json"  # written by `helios profile`
    history: str = "helios-history.jsonl"  # decisions and live profiles, appended; read on restart
    admin: AdminConfig = Field(default_factory=AdminConfig)
    http: HTTPConfig = Field(default_factory=HTTPConfig)
    ingress: IngressConfig = Field(default_factory=IngressConfig)

    @field_validator("memory_budget", mode="before")
    @classmethod
    def _size(cls, value: Any) -> Any:
        return parse_size(value)

    @field_validator("candidates")
    @classmethod
    def _unique_ids(cls, candidates: list[Candidate]) -> list[Candidate]:
        ids = [c.id for c in candidates]
        repeated = sorted({i for i in ids if ids.count(i) > 1})
        if repeated:
            raise ValueError(f"candidate ids must be unique; repeated: {repeated}")
        return candidates

    def candidate(self, candidate_id: str) -> Candidate:
        for candidate in self.candidates:
            if candidate.id == candidate_id:
                return candidate
        raise KeyError(f"no candidate {candidate_id!r} in the SLO file")


def parse_slo(data: dict | None) -> SLOConfig:
    # only None means empty: [] or 0 must be refused as not a mapping, not read as {}
    return validate(SLOConfig, {} if data is None else data, "SLO config")


def load_slo(path: str | Path) -> SLOConfig:
    path = Path(path)
    slo = parse_slo(read_yaml_mapping(path, "SLO file", "model, candidates, objective"))
    # relative files sit beside the SLO file, wherever the controller runs (a Ray worker's cwd differs)
    files = {key: str((path.parent / getattr(slo, key)).resolve()) for key in ("repository", "history")}
    return slo.model_copy(update=files)
