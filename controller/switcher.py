"""Apply a decision: redeploy the public model's LLMServer with the chosen source and depth.

The public model keeps its name (its Serve deployment `LLMServer:<model>`); a new candidate or
depth is a new version of that deployment, so Serve replaces its replicas in a rolling update.

Ray Serve's own default does not keep a replica up during that update: with
`max_surge_percent=0` (the default in Ray 2.60, `ray/serve/_private/config.py`) it "stops old
replicas before starting replacements". Requests are not refused then (Serve's router holds
them until a replica is up) but they wait for the whole start-up of the new engine: measured
on two tiny models here, the slowest request during a switch took 18.9 s of a 19.5 s switch,
against 1.1 s with surge (2 client threads, every other request streamed; zero failures either
way; tests/test_controller_switch.py checks the bound). The switcher therefore deploys every
deployment of the app (ModelConfig's and IngressConfig's fields of the same names) with
`max_surge_percent=100` ("old replicas keep serving until replacements are ready"): the new
replica starts and passes its health check, traffic moves to it, and the old one is stopped
gracefully, finishing its in-flight requests and streams for up to `graceful_shutdown_timeout_s`.
The surge needs room for both replicas at once (CPUs/GPUs and memory) while it lasts.
"""

from __future__ import annotations

import time

from ray import serve

from controller.memory import prefix_engine
from controller.repository import Repository
from controller.slo import SLOConfig
from deployments.app import build_app_from_config
from deployments.config import AuthConfig, ControllerLink, ModelConfig, ServeConfig

SURGE_PERCENT = 100  # a new replica per old one, started before the old one stops
DRAIN_TIMEOUT_S = 120.0  # how long an old replica may take to finish its requests (streams included)


def tag(candidate_id: str, depth: int) -> str:
    """What a replica serving this choice sends with its stats (the controller ignores other tags)."""
    return f"{candidate_id}@{depth}"


def model_config_for(slo: SLOConfig, repository: Repository, candidate_id: str, depth: int,
                     controller: ControllerLink | None = None) -> ModelConfig:
    """The serving entry for `candidate_id` at `depth`: public name, prefix load, the KV cache the
    memory budget leaves after the prefix's weights, surge-first rolling updates, and (`controller`)
    where its replicas send their engine steps."""
    candidate = slo.candidate(candidate_id)
    engine = prefix_engine(candidate.engine, repository.candidates[candidate_id], depth, slo.memory_budget)
    owned = {"id", "depths", "engine", "max_surge_percent", "graceful_shutdown_timeout_s", "controller"}
    fields = candidate.model_dump(exclude=owned)
    link = controller.model_copy(update={"tag": tag(candidate_id, depth)}) if controller else None
    return ModelConfig(id=slo.model, engine=engine, max_surge_percent=SURGE_PERCENT,
                       graceful_shutdown_timeout_s=DRAIN_TIMEOUT_S, controller=link, **fields)


def serve_config_for(slo: SLOConfig, repository: Repository, candidate_id: str, depth: int,
                     controller: ControllerLink | None = None) -> ServeConfig:
    """The whole app for one choice; the ingress is replaced with the model (its config argument
    names the model), so it starts surge-first and drains as well."""
    ingress = slo.ingress.model_copy(update={"max_surge_percent": SURGE_PERCENT,
                                             "graceful_shutdown_timeout_s": DRAIN_TIMEOUT_S})
    # the controller's admin routes (its state and history) only where the SLO turns them on
    routes = slo.admin.route_prefix.rstrip("/") if slo.admin.enabled else ""
    auth = AuthConfig(controller_routes=routes or None)
    return ServeConfig(http=slo.http, ingress=ingress, auth=auth,
                       models=[model_config_for(slo, repository, candidate_id, depth, controller)])


def deploy(config: ServeConfig, app_name: str = "helios", route_prefix: str = "/") -> float:
    """Deploy or update the app; return when every replica of the new version runs (seconds taken).

    serve.run waits for the application to be RUNNING, which during an update means the new
    replicas are up; the old ones may still be draining when it returns.
    """
    started = time.monotonic()
    serve.run(build_app_from_config(config), name=app_name, route_prefix=route_prefix, blocking=False)
    return time.monotonic() - started


def switch(slo: SLOConfig, repository: Repository, candidate_id: str, depth: int, app_name: str = "helios",
           route_prefix: str = "/", controller: ControllerLink | None = None) -> float:
    """Serve `candidate_id` at `depth` under the SLO's public model name (`controller`: where its
    replicas send their engine steps; None: nowhere)."""
    return deploy(serve_config_for(slo, repository, candidate_id, depth, controller), app_name, route_prefix)
