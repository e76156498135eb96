"""Start Ray (embedded, unless RAY_ADDRESS points at a cluster) and Serve a config; `helios serve`."""

from __future__ import annotations

import logging
import os
import signal
import time
from typing import Callable

import ray
from ray import serve
from ray._private import ray_constants

from deployments.app import build_app_from_config
from deployments.config import ServeConfig
from deployments.priority import local_processes, step_back

logger = logging.getLogger("helios.serve")
APP_NAME = "helios"


def start(config: ServeConfig, deploy: Callable[[], None] | None = None) -> str:
    """Deploy `config` and wait until every model replica is up; return the base URL.

    `deploy` replaces the deployment of `config`'s models (the HELIOS controller deploys its own
    choice: controller/serve.py); Ray, Serve's HTTP options and the proxies' niceness stay as here.
    """
    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):
            ray.init()
        else:  # the embedded default: a local Ray instance that lives as long as this process
            # Ray runs its workers at nice 15, behind every ordinary process: on a small
            # machine the engine then yields its cores to whatever runs beside it (clients,
            # tools). At nice 0, HTTP kept 0.89 of in-process throughput instead of 0.76.
            os.environ.setdefault("RAY_worker_niceness", "0")
            if _is_loopback(config.http.host):
                _keep_ray_on_loopback()
            # address="local": a new instance even when another Ray runs on this machine (without it,
            # ray.init joins the one last started here, whoever started it)
            ray.init(address="local", include_dashboard=False, _metrics_export_port=config.metrics_export_port)
    serve.start(http_options={"host": config.http.host, "port": config.http.port})
    logger.info("loading %d model(s): %s", len(config.models), ", ".join(m.id for m in config.models))
    if deploy is None:
        serve.run(build_app_from_config(config), name=APP_NAME, route_prefix="/", blocking=False)
    else:
        deploy()
    for proxy in local_processes("ray::ProxyActor"):  # the HTTP proxy steps back as the ingress does
        step_back(proxy, niceness=config.ingress.niceness)
    return f"http://{config.http.host}:{config.http.port}"


def _is_loopback(host: str) -> bool:
    return host in ("127.0.0.1", "localhost", "::1")


def _keep_ray_on_loopback() -> None:
    """Make the embedded Ray bind its ports (metrics, GCS, raylet) to 127.0.0.1, as HTTP does.

    On Linux Ray binds the machine's address, and `ray.init(_node_ip_address="127.0.0.1")` is
    turned back into that address. Ray's single-machine mode (Windows and macOS by default) uses
    the loopback address instead; RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 selects it for the processes
    Ray starts, and the constant read from it at import selects it in this one.
    """
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False


def drain(grace_s: float) -> dict:
    """Shutdown's first half: the ingress refuses new requests (503), gives in-flight ones `grace_s`
    to finish and ends the rest with an error; returns {"cut": requests ended that way}."""
    ingress = serve.get_deployment_handle("OpenAIIngress", APP_NAME)
    return ingress.drain.remote(grace_s).result(timeout_s=grace_s + 30)


def stop() -> None:
    serve.shutdown()
    ray.shutdown()


def _interrupt(*_) -> None:
    raise KeyboardInterrupt


PROXY_FLUSH_S = 1.0  # seen needed under load: at once, a cut stream sometimes lost its last bytes


def serve_forever(config: ServeConfig, starter: Callable[[ServeConfig], str] = start,
                  before_drain: Callable[[], None] | None = None) -> None:
    """Serve until Ctrl-C or SIGTERM, then shut Serve and Ray down cleanly.

    `starter` brings the service up (default: `start`); `before_drain` runs first on shutdown
    (the controller is stopped there, so that no switch replaces the draining ingress).
    """
    for signum in (signal.SIGINT, signal.SIGTERM):  # explicit: SIGINT may arrive ignored in a background job
        signal.signal(signum, _interrupt)
    try:
        url = starter(config)
        print(f"Helios is serving {', '.join(m.id for m in config.models)} at {url}/v1 "
              f"(metrics: http://127.0.0.1:{config.metrics_export_port}/metrics); Ctrl-C stops it.", flush=True)
        while True:
            time.sleep(1)
    except KeyboardInterrupt:  # a second Ctrl-C during the grace period skips the rest of it
        started = time.monotonic()
        print(f"shutting down: in-flight requests get {config.ingress.shutdown_grace_s:g} s", flush=True)
        try:
            if before_drain is not None:
                before_drain()
            cut = drain(config.ingress.shutdown_grace_s)["cut"]
            print(f"drained: {cut} request(s) cut", flush=True)
            if cut:  # the ingress has sent the cut streams' last events; the HTTP proxy, a process of its
                time.sleep(PROXY_FLUSH_S)  # own, still has to pass them on before Serve stops it
        except Exception as exc:  # e.g. Serve never came up: nothing to drain
            logger.warning("drain failed: %r", exc)
        stop()
        print(f"stopped in {time.monotonic() - started:.1f} s", flush=True)
    finally:
        if ray.is_initialized():
            stop()
