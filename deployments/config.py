"""The serving config: one YAML file, validated here, used by `helios serve`, `serve run` and RayService.

    http: {host: 127.0.0.1, port: 8000}
    models:
      - id: smollm2              # what clients send as "model"
        source: smollm2-135m     # alias, Hugging Face folder or GGUF file
        engine: {max_layers: 30, kv_cache_memory: 512MiB, exit_policy: none}
        replicas: 1
        num_cpus: 1

Engine options are `helios.config.EngineConfig`'s fields (one definition, also used by the
CLI). Unknown keys and bad values fail with the key path and the reason.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator,
                      model_validator)

from helios.config import EngineConfig
from helios.config import DEFAULT_MODEL
from deployments.autoscaling import POLICY_PATH

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(value: Any) -> Any:
    """'512MiB' or '1GB' -> bytes; numbers pass through; anything else is left for pydantic to reject."""
    if isinstance(value, str):
        match = _SIZE.match(value)
        if not match:
            raise ValueError(f"{value!r} is not a size: write bytes or e.g. 512MiB, 1GiB")
        size = float(match.group(1)) * _UNITS[(match.group(2) or "b").lower()]
        if size == float("inf"):  # "999...9GiB" past a float's range (found by tests/test_fuzz.py)
            raise ValueError(f"{value!r} is too large a size")
        return int(size)
    return value


def source_under_roots(source: str, roots: list[str]) -> bool:
    """Whether a model source is an alias (a bare name) or a path inside one of `roots` (links resolved)."""
    expanded = os.path.expanduser(source)
    if not ("/" in source or "\\" in source or source.startswith((".", "~")) or os.path.exists(expanded)):
        return True  # an alias: the catalog says where its file lives
    real = os.path.realpath(expanded)
    for root in roots:
        root = os.path.realpath(os.path.expanduser(root))
        if os.path.commonpath([real, root]) == root:
            return True
    return False


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class HTTPConfig(_Strict):
    host: str = "127.0.0.1"  # address Serve's HTTP proxy listens on (`helios serve`; 0.0.0.0 for all)
    port: int = Field(8000, ge=1, le=65535)  # its port


class AutoscalingConfig(_Strict):
    """Serve's autoscaling of one model's replicas, between `min_replicas` and `max_replicas` (set it
    instead of a fixed `replicas`). A change must be wanted for the whole delay before Serve acts."""

    # never fewer; no scale to zero: a replica loads its model before it serves the first request
    min_replicas: int = Field(1, ge=1)
    max_replicas: int = Field(2, ge=1)  # never more; each needs its num_cpus / num_gpus free on some node
    # ongoing requests per replica (running + waiting in the engine + queued in Serve) to size for:
    # well under max_ongoing_requests, so that a replica is added before requests queue
    target_ongoing_requests: float = Field(8.0, gt=0)
    # `helios`: scale on the worse of load (as Serve's) and recent p95 time to first token over
    # target_ttft_s, shrink only with margin (deployments/autoscaling.py); `default`: Serve's, load only
    policy: Literal["helios", "default"] = "helios"
    target_ttft_s: float = Field(2.0, gt=0)  # `helios` policy: the time to first token to stay under
    upscale_delay_s: float = Field(30.0, ge=0)  # how long more replicas must be wanted before one is added
    downscale_delay_s: float = Field(600.0, ge=0)  # how long fewer must be wanted before one is stopped
    look_back_period_s: float = Field(30.0, gt=0)  # the window Serve averages the signals over
    # how often replicas and handles send their signals to Serve's controller
    metrics_interval_s: float = Field(10.0, gt=0)

    @model_validator(mode="after")
    def _min_below_max(self) -> "AutoscalingConfig":
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas ({self.max_replicas}) is below min_replicas ({self.min_replicas})")
        return self

    def serve_options(self) -> dict:
        """Serve's `autoscaling_config` for these settings."""
        options = self.model_dump(exclude={"policy", "target_ttft_s"})
        if self.policy == "helios":
            options["policy"] = {"policy_function": POLICY_PATH, "policy_kwargs": {"target_ttft_s": self.target_ttft_s}}
        return options


# The HELIOS controller's named Ray actors (controller/actor.py, controller/live_profile.py); named
# here because replicas and the ingress look them up and deployments/ does not import controller/
ACTORS_NAMESPACE = "helios"
CONTROLLER_ACTOR = "helios-controller"
PROFILER_ACTOR = "helios-profiler"


class ControllerLink(_Strict):
    """Where a replica sends its engine steps (set by the controller's switcher, not by hand)."""

    actor: str = CONTROLLER_ACTOR  # the controller's named Ray actor
    namespace: str = ACTORS_NAMESPACE  # its Ray namespace
    tag: str = ""  # sent with every batch: the choice (candidate@depth) this replica serves


class ModelConfig(_Strict):
    id: str = Field(DEFAULT_MODEL, min_length=1, pattern=r"^[A-Za-z0-9._\-/:]+$")  # what clients send as "model"
    source: str = DEFAULT_MODEL  # alias, Hugging Face folder or GGUF file
    engine: EngineConfig = Field(default_factory=EngineConfig)  # every option but `model` (that is `source`)
    replicas: int = Field(1, ge=1)  # Serve replicas of this model, one engine each
    autoscaling: AutoscalingConfig | None = None  # instead of a fixed `replicas` (below)
    num_cpus: float = Field(1.0, ge=0)  # CPUs reserved per replica; torch uses this many threads
    num_gpus: float = Field(0.0, ge=0)  # GPUs reserved per replica (on KubeRay: the GPU worker group)
    # per replica: requests in flight (running + waiting in the engine); beyond that they queue in
    # Serve's router, and beyond max_queued_requests the ingress answers 503 with Retry-After.
    # Default 64; with an spf policy, at least engine.max_num_seqs + engine.length_lookahead (the
    # requests it ranks must be in the engine to be ranked)
    max_ongoing_requests: int = Field(64, ge=1)
    max_queued_requests: int = Field(64, ge=0)  # per replica, waiting in Serve's router
    # tokens per streamed chunk after the first: each chunk costs serialization and hops between
    # processes, so a larger interval leaves more CPU to the engine (vLLM's --stream-interval)
    stream_interval: int = Field(1, ge=1)
    # under load, chunks grow so that a replica sends about this many per engine step in all
    # (ceil(running / this) tokens each, never fewer than stream_interval); 0 = off
    stream_chunks_per_step: int = Field(8, ge=0)
    # rolling updates (a redeploy with a new source or depth): extra replicas, as a percentage of
    # `replicas`, started and warm before old ones stop (0, Serve's default: stop first, then start)
    max_surge_percent: int = Field(0, ge=0, le=100)
    # how long a replica being replaced or stopped may take to finish its requests and streams
    graceful_shutdown_timeout_s: float = Field(20.0, ge=0)
    # set when a HELIOS controller serves this model: the replicas send it their engine steps
    controller: ControllerLink | None = None

    @field_validator("autoscaling")
    @classmethod
    def _fixed_or_autoscaled(cls, autoscaling: AutoscalingConfig | None, info: ValidationInfo) -> Any:
        replicas = info.data.get("replicas", 1)
        if autoscaling is not None and replicas > 1:
            raise ValueError(f"set either replicas ({replicas}, fixed) or autoscaling "
                             f"(min_replicas..max_replicas), not both")
        return autoscaling

    @model_validator(mode="before")
    @classmethod
    def _engine_model_is_source(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("engine"), dict):
            engine = dict(data["engine"])
            if "model" in engine:
                raise ValueError("set the model with `source`, not `engine.model`")
            if "kv_cache_memory" in engine:
                engine["kv_cache_memory"] = parse_size(engine["kv_cache_memory"])
            data = {**data, "engine": engine}
        return data

    @model_validator(mode="after")
    def _room_to_rank(self) -> "ModelConfig":
        if self.engine.scheduling_policy == "fcfs":
            return self
        ranked = self.engine.max_num_seqs + self.engine.length_lookahead
        if "max_ongoing_requests" not in self.model_fields_set:
            self.max_ongoing_requests = max(self.max_ongoing_requests, ranked)
        elif self.max_ongoing_requests < ranked:
            raise ValueError(
                f"max_ongoing_requests ({self.max_ongoing_requests}) is below engine.max_num_seqs "
                f"({self.engine.max_num_seqs}) + engine.length_lookahead ({self.engine.length_lookahead}): "
                f"{self.engine.scheduling_policy} could rank only the requests the engine holds; raise it "
                f"to {ranked} or lower length_lookahead")
        return self

    def engine_config(self) -> EngineConfig:
        options = {k: v for k, v in vars(self.engine).items() if k != "model"}
        return EngineConfig(model=self.source, **options)


class IngressConfig(_Strict):
    replicas: int = Field(1, ge=1)  # replicas of the OpenAI ingress (it routes by `model`)
    num_cpus: float = Field(0.0, ge=0)  # CPUs reserved per ingress replica
    retry_after_s: int = Field(1, ge=1)  # the Retry-After a client gets when a model's queue is full
    # niceness of the HTTP processes (ingress replicas; Serve's proxies on the machine that runs
    # `helios serve`): above the engine's, so an engine beside them keeps the CPU, yet not so far that
    # they starve when other work keeps every core busy (at 19 most requests then hung; at 5 none did,
    # for ~5% of HTTP throughput on an idle machine; deployments/priority.py)
    niceness: int = Field(5, ge=0, le=19)
    # HTTP requests one ingress replica answers at once; past it, /v1 requests get 503 + Retry-After
    # before their body is read (the cheapest answer), so an ingress short of CPU sheds load instead of
    # queueing it. None: the models' queues together (replicas, or max_replicas, x (max_ongoing_requests
    # + max_queued_requests), summed), shared among the ingress replicas, plus a quarter, so that
    # normally a model's own full queue answers the 503 first
    max_in_flight: int | None = Field(None, ge=1)
    docs: bool = False  # FastAPI's /docs, /redoc and /openapi.json (off: they describe the API to anyone)
    log_prompts: bool = False  # request logs carry ids, sizes and timings; prompt and output text only if on
    # on Ctrl-C/SIGTERM of `helios serve`: new requests get 503, in-flight ones get this long to finish,
    # then the rest end with an error (streams: an error event, then [DONE])
    shutdown_grace_s: float = Field(5.0, ge=0, le=600)
    # rolling updates of the ingress (it is replaced with any model, whose config it is given):
    # extra replicas, as a percentage, started and warm before old ones stop (0: stop first)
    max_surge_percent: int = Field(0, ge=0, le=100)
    graceful_shutdown_timeout_s: float = Field(20.0, ge=0)  # how long a replaced ingress replica may drain


class LimitsConfig(_Strict):
    """What one request may ask for; checked in the ingress before anything is parsed or allocated."""

    max_body_bytes: int = Field(4 << 20, ge=1024)  # larger bodies get 413 before they are parsed
    max_n: int = Field(16, ge=1, le=16)
    max_top_logprobs: int = Field(20, ge=0, le=20)  # completions `logprobs`, chat `top_logprobs`
    max_stop: int = Field(4, ge=0)  # stop strings per request (OpenAI allows 4)
    max_stop_chars: int = Field(256, ge=1)  # characters per stop string
    max_prompt_chars: int = Field(256 << 10, ge=1)  # characters of all prompts (or messages) together
    max_prompt_items: int = Field(64, ge=1)  # prompts in a list, messages in a chat
    max_tokens: int | None = Field(None, ge=1)  # a cap on max_tokens; None: only the context bounds it

    @field_validator("max_body_bytes", mode="before")
    @classmethod
    def _size(cls, value: Any) -> Any:
        return parse_size(value)


class AuthConfig(_Strict):
    """Keys never sit in the config: HELIOS_API_KEYS (comma-separated) and/or a file of keys, one a line."""

    api_keys_file: str | None = None
    admin_routes: bool = False  # /admin/... (engine state per model), under HELIOS_ADMIN_KEY
    # PREFIX/controller: the HELIOS controller's state and performance history (decisions and live
    # profiles; `?limit=`), under HELIOS_ADMIN_KEY, outside the OpenAPI schema; None = off (404).
    # `helios serve slo.yaml` sets it from the SLO's `admin` (route_prefix when enabled)
    controller_routes: str | None = Field(None, pattern=r"^/[A-Za-z0-9._\-/]*[A-Za-z0-9._\-]$")


class ServeConfig(_Strict):
    http: HTTPConfig = Field(default_factory=HTTPConfig)
    metrics_export_port: int = Field(8080, ge=1, le=65535)  # Ray's Prometheus endpoint (`helios serve` only)
    ingress: IngressConfig = Field(default_factory=IngressConfig)
    models: list[ModelConfig] = Field(default_factory=lambda: [ModelConfig()], min_length=1)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    auth: AuthConfig = Field(default_factory=AuthConfig)
    model_roots: list[str] | None = None  # when set, model sources that are paths must lie under one of these

    @model_validator(mode="after")
    def _sources_under_roots(self) -> "ServeConfig":
        if self.model_roots is not None:
            for index, model in enumerate(self.models):
                if not source_under_roots(model.source, self.model_roots):
                    raise ValueError(f"models.{index}.source: {model.source!r} is outside model_roots {self.model_roots}")
        return self

    def ingress_max_in_flight(self) -> int:
        """The HTTP requests one ingress replica answers at once (`ingress.max_in_flight`, or derived)."""
        if self.ingress.max_in_flight is not None:
            return self.ingress.max_in_flight
        queues = sum((m.autoscaling.max_replicas if m.autoscaling else m.replicas)
                     * (m.max_ongoing_requests + m.max_queued_requests) for m in self.models)
        share = -(-queues // self.ingress.replicas)  # ceil: replicas share the load about evenly
        return share + max(1, share // 4)

    @field_validator("models")
    @classmethod
    def _unique_ids(cls, models: list[ModelConfig]) -> list[ModelConfig]:
        ids = [m.id for m in models]
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        if duplicates:
            raise ValueError(f"model ids must be unique; repeated: {duplicates}")
        return models


class ConfigError(ValueError):
    """A config that cannot be used; the message lists each bad key path and why."""


def _describe(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        path = ".".join(str(part) for part in item["loc"]) or "(top level)"
        lines.append(f"  {path}: {item['msg']}")
    return "\n".join(lines)


def validate(schema: type[BaseModel], data: Any, what: str) -> Any:
    """`data` as a `schema`, or a ConfigError naming each bad key path (`what`: "serving config")."""
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"invalid {what}:\n" + _describe(exc)) from None


def read_yaml_mapping(path: str | Path, what: str, top_keys: str) -> dict | None:
    """A YAML file's top-level mapping (None for an empty file); ConfigError for anything else."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    except UnicodeDecodeError as exc:  # bytes that are not text (found by tests/test_fuzz.py)
        raise ConfigError(f"{path} is not UTF-8 text: {exc}") from None
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping ({top_keys}, ...)")
    return data


def parse_config(data: dict | None) -> ServeConfig:
    """Validate a config mapping (None or {} = the default model with defaults)."""
    # only None means empty: [] or 0 must be refused as not a mapping, not read as {}
    return validate(ServeConfig, {} if data is None else data, "serving config")


def load_config(path: str | Path) -> ServeConfig:
    return parse_config(read_yaml_mapping(path, "config file", "http, models"))
