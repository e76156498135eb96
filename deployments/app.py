"""Config -> Serve application.

    serve run deployments.app:build_app config=serve.yaml      # a YAML file
    serve run deployments.app:build_app                        # the default model

In a RayService, `serveConfigV2` names `import_path: deployments.app:build_app` and puts the
config itself under `args` (http, models, ...); `helios serve` calls `build_app` the same way.
"""

from __future__ import annotations

from ray.serve import Application

from deployments.config import ModelConfig, ServeConfig, load_config, parse_config
from deployments.ingress import OpenAIIngress
from deployments.llm_server import LLMServer


def server_name(model_id: str) -> str:
    """The Serve deployment name of a model's LLMServer."""
    return f"LLMServer:{model_id.replace('/', '--')}"


def replica_count(model: ModelConfig) -> dict:
    """Serve's options for how many replicas: fixed, or autoscaled (Serve refuses both at once)."""
    if model.autoscaling is not None:
        return {"autoscaling_config": model.autoscaling.serve_options()}
    return {"num_replicas": model.replicas}


def build_app_from_config(config: ServeConfig) -> Application:
    servers = {}
    for model in config.models:
        actor_options = {"num_cpus": model.num_cpus}
        if model.num_gpus:
            actor_options["num_gpus"] = model.num_gpus
        servers[model.id] = LLMServer.options(
            name=server_name(model.id), **replica_count(model), ray_actor_options=actor_options,
            max_ongoing_requests=model.max_ongoing_requests, max_queued_requests=model.max_queued_requests,
            max_surge_percent=model.max_surge_percent, graceful_shutdown_timeout_s=model.graceful_shutdown_timeout_s,
        ).bind(model)
    ingress = config.ingress
    return OpenAIIngress.options(
        num_replicas=ingress.replicas, ray_actor_options={"num_cpus": ingress.num_cpus},
        # every request reaches the guard, which refuses past ingress.max_in_flight with OpenAI's 503 body
        # (a lower bound here would queue requests in Serve's proxy, or refuse them with its plain-text 503)
        max_ongoing_requests=10_000,
        max_surge_percent=ingress.max_surge_percent, graceful_shutdown_timeout_s=ingress.graceful_shutdown_timeout_s,
    ).bind(servers, config)


def build_app(args: dict | None = None) -> Application:
    """`args` is either {"config": PATH} or the config itself (as in a RayService)."""
    args = dict(args or {})
    if set(args) == {"config"} and isinstance(args["config"], str):
        return build_app_from_config(load_config(args["config"]))
    return build_app_from_config(parse_config(args))
