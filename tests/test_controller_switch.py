"""The switcher's serving config (surge first, drain, the link to the controller), and the traffic
helpers of the end-to-end switch test (tests/test_controller_serve.py: the controller's own loop
deepens and switches under traffic on a real local Ray Serve; every request must succeed)."""

from collections import deque
import threading
import time

import httpx

from conftest import post_chat
from controller.slo import parse_slo
from controller.switcher import model_config_for
from test_controller_repository import MiB, candidate, repository


def tiny_slo(llama, qwen, port: int):
    return parse_slo({"model": "assistant", "memory_budget": "24MiB", "http": {"host": "127.0.0.1", "port": port},
                      "ingress": {"num_cpus": 0, "niceness": 0},
                      "candidates": [{"id": "llama", "source": str(llama), "depths": [2, 4], "num_cpus": 0},
                                     {"id": "qwen", "source": str(qwen), "depths": [4], "num_cpus": 0}]})


TINY_REPO = repository(llama=candidate(num_layers=4, layer_bytes=MiB // 8, shared=MiB, kv_per_layer=256,
                                       depths={2: {}, 4: {}}),
                       qwen=candidate(num_layers=4, layer_bytes=MiB // 8, shared=MiB, kv_per_layer=256))


def test_model_config_follows_the_decision():
    slo = tiny_slo("/tmp/a", "/tmp/b", 8000)
    model = model_config_for(slo, TINY_REPO, "llama", 2)
    assert (model.id, model.source, model.engine.max_layers) == ("assistant", "/tmp/a", 2)
    assert model.engine.kv_cache_memory == 24 * MiB - (MiB + 2 * MiB // 8)  # the budget after the prefix
    assert model_config_for(slo, TINY_REPO, "llama", 4).engine.kv_cache_memory < model.engine.kv_cache_memory


def test_every_deployment_starts_its_replacement_first():
    """Through the public config fields: the switcher's ServeConfig asks for surge and a long drain,
    and build_app passes both to Serve for the model and the ingress."""
    from deployments.app import build_app_from_config
    from controller.switcher import DRAIN_TIMEOUT_S, SURGE_PERCENT, serve_config_for

    config = serve_config_for(tiny_slo("/tmp/a", "/tmp/b", 8000), TINY_REPO, "llama", 2)
    for entry in (config.ingress, *config.models):
        assert (entry.max_surge_percent, entry.graceful_shutdown_timeout_s) == (SURGE_PERCENT, DRAIN_TIMEOUT_S)
    assert SURGE_PERCENT == 100
    assert config.models[0].controller is None  # no controller named: the replicas send stats nowhere
    # what Serve gets: its deployment config of every deployment in the app (read through the
    # app's graph only here, in the test; the switcher itself never reaches into it)
    ingress = build_app_from_config(config)._bound_deployment
    servers = [value._bound_deployment for value in ingress.init_args[0].values()]
    assert [s.name for s in servers] == ["LLMServer:assistant"]
    for deployment in (ingress, *servers):
        assert deployment._deployment_config.max_surge_percent == 100
        assert deployment._deployment_config.graceful_shutdown_timeout_s == DRAIN_TIMEOUT_S
    assert servers[0].init_args[0].engine.max_layers == 2


def test_plain_serving_keeps_serves_defaults():
    from deployments.config import parse_config

    model = parse_config({}).models[0]
    assert (model.max_surge_percent, model.graceful_shutdown_timeout_s, model.controller) == (0, 20.0, None)


def test_a_linked_replica_reports_its_choice():
    from deployments.config import ControllerLink

    model = model_config_for(tiny_slo("/tmp/a", "/tmp/b", 8000), TINY_REPO, "llama", 2, ControllerLink())
    assert (model.controller.actor, model.controller.tag) == ("helios-controller", "llama@2")


class Clients:
    """Threads that send requests in a loop (every other one streamed) until stopped; they count outcomes."""

    def __init__(self, base_url: str, threads: int = 2):
        self.base_url, self.stop = base_url, threading.Event()
        self.ok, self.failed, self.latencies = 0, [], []
        self.recent_depths: deque[int] = deque(maxlen=4)  # deepest exit layer of the latest requests
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._loop, args=(i,), daemon=True) for i in range(threads)]

    def _one(self, stream: bool) -> list[int]:
        body = {"model": "assistant", "max_tokens": 12, "stream": stream, "return_exit_layers": True,
                "messages": [{"role": "user", "content": "The capital of France"}]}
        return [layer for chunk in post_chat(self.base_url, body) for layer in chunk["choices"][0].get("exit_layers") or []]

    def _loop(self, index: int) -> None:
        n = 0
        while not self.stop.is_set():
            n += 1
            try:
                started = time.monotonic()
                layers = self._one(stream=(index + n) % 2 == 0)
                with self.lock:
                    self.latencies.append(time.monotonic() - started)
                    self.ok += 1
                    self.recent_depths.append(max(layers))
            except Exception as exc:  # every failure is counted and reported
                with self.lock:
                    self.failed.append(repr(exc))

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def join(self) -> None:
        self.stop.set()
        for thread in self.threads:
            if thread.ident is not None:  # started (a failure before start() leaves them unstarted)
                thread.join(timeout=150)


def eventually(condition, timeout_s: float = 90) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.2)
    return condition()


def serves(clients: Clients, depth: int) -> bool:
    """The latest requests all ran `depth` layers (requests routed to a draining replica before the
    routers learnt of the switch may still show the old depth for a moment)."""
    latest = list(clients.recent_depths)
    return len(latest) == clients.recent_depths.maxlen and set(latest) == {depth}


def card(clients: Clients) -> dict:
    return httpx.get(clients.base_url + "/v1/models", timeout=30).json()["data"][0]
