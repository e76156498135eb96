"""`helios serve slo.yaml`: Ray and Serve as for a serving config, with the controller choosing what runs.

The controller actor (controller/actor.py) makes the first decision from the model repository
and deploys it through the switcher, with the replicas linked back to it (they send it their
engine steps); from then on it redeploys as it decides. Shutdown is the serving command's
(deployments/run.py), with the controller stopped first so that no switch replaces the
draining ingress.
"""

from __future__ import annotations

import functools
import logging
import time
from pathlib import Path

import ray

from controller.actor import ACTOR_NAME, NAMESPACE, get_controller, start_controller
from controller.repository import Repository, load_repository
from controller.slo import SLOConfig, load_slo
from controller.switcher import switch
from deployments import run
from deployments.config import ConfigError, ControllerLink, ModelConfig, ServeConfig, read_yaml_mapping

logger = logging.getLogger("helios.controller")
SLO_KEYS = ("candidates", "objective")  # top-level keys only an SLO file has
# the actors' handles (controller, profiler): Ray destroys an actor that is not detached once no
# handle to it is left, named or not, so this process keeps them for as long as it serves
_handles: list = []


def is_slo_file(path: str | Path) -> bool:
    data = read_yaml_mapping(path, "config file", "http, models")
    return isinstance(data, dict) and any(key in data for key in SLO_KEYS)


def load(path: str | Path) -> tuple[SLOConfig, Repository]:
    """The SLO file and the model repository it names (a missing repository says how to write it)."""
    slo = load_slo(path)
    if not Path(slo.repository).is_file():
        raise ConfigError(f"the model repository {slo.repository} does not exist; measure the candidates "
                          f"first: helios profile {path}")
    return slo, load_repository(slo.repository)


def serve_config(slo: SLOConfig) -> ServeConfig:
    """What the serving command needs besides the models: HTTP, the ingress's shutdown grace, and the
    public model name (the controller deploys the models itself)."""
    return ServeConfig(http=slo.http, ingress=slo.ingress, models=[ModelConfig(id=slo.model)])


def deploy_through_controller(slo: SLOConfig, repository: Repository, timeout_s: float = 900.0) -> dict:
    """Start the controller actor (or find it) and wait until its choice runs; returns its `current()`."""
    link = ControllerLink(actor=ACTOR_NAME, namespace=NAMESPACE)
    actor = start_controller(slo, repository, apply=functools.partial(switch, controller=link))
    _handles.append(actor)
    ray.get(actor.deploy.remote())
    deadline = time.monotonic() + timeout_s
    while True:
        state = ray.get(actor.current.remote())
        busy = state["applying"] or state["pending"]  # a failed attempt's retry waits as pending
        if state["apply_error"] and not busy:
            raise RuntimeError(f"the controller could not deploy {state['apply_error']} "
                               f"({state['apply_failures']} attempts)")
        if state["applied"] and not busy:
            logger.info("the controller serves %s as %s", slo.model, state["applied"])
            return state
        if time.monotonic() > deadline:
            raise TimeoutError(f"the controller's first deployment took over {timeout_s:g} s: {state}")
        time.sleep(0.5)


def start(slo: SLOConfig, repository: Repository, config: ServeConfig | None = None,
          live_profiling: bool = True) -> str:
    """Ray, Serve, the controller and its first deployment, then (`live_profiling`) the live
    profiler (controller/live_profile.py), which the ingress feeds once it exists; returns the base URL."""
    config = config or serve_config(slo)
    url = run.start(config, deploy=lambda: deploy_through_controller(slo, repository))
    if live_profiling:
        from controller.live_profile import start_profiler

        _handles.append(start_profiler(slo, repository))
    return url


def stop_controller() -> None:
    try:
        ray.kill(get_controller(), no_restart=True)
    except ValueError:  # not running
        pass
    _handles.clear()


def serve_forever(path: str | Path, host: str | None = None, port: int | None = None) -> None:
    """Serve an SLO file until Ctrl-C or SIGTERM (`host`, `port`: override its `http`)."""
    slo, repository = load(path)
    overrides = {key: value for key, value in (("host", host), ("port", port)) if value}
    if overrides:
        slo = slo.model_copy(update={"http": slo.http.model_copy(update=overrides)})
    run.serve_forever(serve_config(slo), starter=lambda config: start(slo, repository, config),
                      before_drain=stop_controller)
