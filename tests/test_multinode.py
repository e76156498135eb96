"""Past one machine, simulated: a Ray cluster of three nodes on 127.0.0.1 (`ray.cluster_utils.Cluster`),
Serve's one HTTP endpoint on the head, a tiny model autoscaled by the `helios` policy between 1 and
2 replicas, each replica needing a whole worker node. Load makes the policy add a replica on the
other worker node, both replicas serve requests from the one endpoint, removing the load lets the
second replica go, and every request succeeds.

The load is sized so that only the policy's TTFT signal can call for the second replica: the
engine runs one sequence at a time (max_num_seqs 1), so six clients make requests wait for their
first token, while the load target (100 ongoing requests per replica) is never approached; Serve's
default policy would stay at one replica. The scale-up therefore shows the whole path: each
replica's `record_autoscaling_stats`, Serve's controller on the head, the policy it unpickled.

The scenario runs in a child process (`python tests/test_multinode.py MODEL_DIR PORT`): its own
Ray driver and cluster, in its own temp dir (so no `ray.init()` elsewhere on the machine finds it),
beside the session's single-node Ray of the serving tests, whatever ran first. It prints one JSON
line of what it saw; the test checks it. Bounded: each phase has a deadline, the child a timeout,
and the child shuts the cluster down whatever fails.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.multinode

APP, MODEL = "helios", "tiny"
CHILD_TIMEOUT_S = 240  # a loaded 2-core machine; on an idle one the whole run takes far less (see report)
CLIENTS = 6  # concurrent requests under load: with one sequence at a time, five wait for a first token
TARGET_TTFT_S = 0.05  # a queue of five 24-token requests takes several times this on any CPU
AUTOSCALING = {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 100, "policy": "helios",
               "target_ttft_s": TARGET_TTFT_S, "upscale_delay_s": 1, "downscale_delay_s": 4,
               "look_back_period_s": 2, "metrics_interval_s": 0.5}


def test_autoscaling_across_simulated_nodes(tiny_chat_model_dir):
    from conftest import free_port

    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "OMP_NUM_THREADS": "1"}
    env.pop("RAY_ADDRESS", None)
    command = [sys.executable, __file__, str(tiny_chat_model_dir("llama")), str(free_port())]
    child = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = child.communicate(timeout=CHILD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        child.send_signal(2)  # SIGINT: the child's `finally` shuts its cluster down
        try:
            stdout, stderr = child.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            child.kill()
            stdout, stderr = child.communicate()
        pytest.fail(f"the multi-node scenario ran past {CHILD_TIMEOUT_S} s:\n{stdout[-3000:]}\n{stderr[-3000:]}")
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    assert child.returncode == 0 and lines, f"rc {child.returncode}:\n{stdout[-3000:]}\n{stderr[-5000:]}"
    seen = json.loads(lines[-1])
    print(json.dumps(seen, indent=1))  # shown with -s: the phase timings
    worker_nodes = set(seen["worker_nodes"])
    assert len(worker_nodes) == 2 and seen["head_node"] not in worker_nodes
    assert seen["replicas_at_start"] == 1
    assert seen["policy_in_controller_log"], "Serve's controller did not load the helios policy"
    # load: a second replica, on the other worker node, and both serve through the one endpoint
    assert seen["scaled_up"], seen
    assert len(seen["peak_replica_nodes"]) == 2 and set(seen["peak_replica_nodes"]) == worker_nodes
    assert seen["replicas_seen_busy"] == 2, "both replicas took requests from the one endpoint"
    assert seen["ttft_signal_s"] > TARGET_TTFT_S  # what drove it (load alone was 6 of 100 per replica)
    # no load: back to one replica, and it still serves
    assert seen["scaled_down"], seen
    assert seen["final_replicas"] == 1
    # not one request failed, during the scale-up, while two served, or across the scale-down
    assert seen["failed"] == [] and seen["ok"] >= 20 and seen["ok_after_scale_down"] >= 3


# --- the child process ------------------------------------------------------------------------------


def _replicas(deployment: str) -> list[dict]:
    """The deployment's RUNNING replicas, with their node ids and actor names (Serve's controller)."""
    from ray.serve.context import _get_global_client

    details = _get_global_client().get_serve_details()
    replicas = details["applications"][APP]["deployments"][deployment]["replicas"]
    return [r for r in replicas if r["state"] == "RUNNING"]


def _busy(replica: dict) -> int:
    """Requests in flight on one replica now, asked of its actor (0 if it is going away)."""
    import ray

    try:
        actor = ray.get_actor(replica["actor_name"], namespace="serve")
        return ray.get(actor.get_num_ongoing_requests.remote(), timeout=10)
    except Exception:
        return 0


class Load:
    """CLIENTS loops of completions against the one endpoint, on a thread, until stopped."""

    def __init__(self, url: str, clients: int):
        self.url, self.clients = url, clients
        self.ok, self.failed, self.stop = 0, [], threading.Event()
        self.thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    async def _run(self) -> None:
        import httpx

        async with httpx.AsyncClient(timeout=60) as http:
            await asyncio.gather(*(self._client(http, i) for i in range(self.clients)))

    async def _client(self, http, index: int) -> None:
        body = {"model": MODEL, "prompt": f"Hello {index}", "max_tokens": 24, "temperature": 0}
        while not self.stop.is_set():
            try:
                response = await http.post(self.url, json=body)
                if response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 24:
                    self.ok += 1
                else:
                    self.failed.append(f"{response.status_code}: {response.text[:200]}")
            except Exception as exc:  # a refused or cut connection is a failed request too
                self.failed.append(repr(exc))

    def __enter__(self) -> "Load":
        self.thread.start()
        return self

    def __exit__(self, *_) -> None:
        self.stop.set()
        self.thread.join(timeout=90)


def _until(condition, deadline_s: float, period_s: float = 0.5) -> bool:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(period_s)
    return False


def _ttft_signal(deployment: str) -> float:
    """One replica's TTFT signal now, as it reports it to Serve's controller."""
    from ray import serve

    from deployments.autoscaling import TTFT_METRIC

    handle = serve.get_deployment_handle(deployment, APP)
    return handle.record_autoscaling_stats.remote().result(timeout_s=30)[TTFT_METRIC]


def _policy_in_controller_log(temp_dir: str) -> bool:
    from deployments.autoscaling import POLICY_PATH

    logs = Path(temp_dir, "session_latest", "logs", "serve").glob("controller_*.log")
    return any(f"Using custom autoscaling policy '{POLICY_PATH}'" in log.read_text(errors="replace") for log in logs)


def scenario(model_dir: str, port: int) -> dict:
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    from deployments.app import build_app_from_config, server_name
    from deployments.config import parse_config

    started, times = time.monotonic(), {}
    mark = lambda name: times.setdefault(name, round(time.monotonic() - started, 1))  # noqa: E731
    temp_dir = tempfile.mkdtemp(prefix="rmn-")  # short: Ray's socket paths live under it
    # the head holds Serve's controller, its HTTP proxy and the ingress (all 0 CPUs); each worker
    # node has 1 CPU and each replica needs 1, so replicas can only sit one per worker node
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False,
                                                            "include_log_monitor": False, "temp_dir": temp_dir})
    try:
        workers = [cluster.add_node(num_cpus=1, include_log_monitor=False, temp_dir=temp_dir) for _ in range(2)]
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        mark("cluster_up")
        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
        config = parse_config({"models": [{"id": MODEL, "source": model_dir, "num_cpus": 1,
                                           "engine": {"kv_cache_memory": "16MiB", "max_num_seqs": 1},
                                           "autoscaling": AUTOSCALING}],
                               "ingress": {"num_cpus": 0}})
        serve.run(build_app_from_config(config), name=APP, route_prefix="/", blocking=False)
        deployment = server_name(MODEL)
        seen = {"head_node": cluster.head_node.node_id, "worker_nodes": [w.node_id for w in workers],
                "replicas_at_start": len(_replicas(deployment)),
                "policy_in_controller_log": _policy_in_controller_log(temp_dir)}
        mark("serving")
        url = f"http://127.0.0.1:{port}/v1/completions"
        busy_nodes: set[str] = set()
        with Load(url, CLIENTS) as load:
            def two_serving() -> bool:
                replicas = _replicas(deployment)
                busy_nodes.update(r["node_id"] for r in replicas if _busy(r) > 0)
                seen["peak_replica_nodes"] = sorted({r["node_id"] for r in replicas})
                return len(replicas) == 2 and len(busy_nodes) == 2

            time.sleep(1)  # a queue has formed
            seen["ttft_signal_s"] = max(_ttft_signal(deployment) for _ in range(3))
            seen["scaled_up"] = _until(lambda: len(_replicas(deployment)) == 2, 90)
            mark("scaled_up")
            _until(two_serving, 30, period_s=0.2)
            mark("both_served")
        seen["replicas_seen_busy"], seen["ok_under_load"] = len(busy_nodes), load.ok
        seen["scaled_down"] = _until(lambda: len(_replicas(deployment)) == 1, 60)
        mark("scaled_down")
        seen["final_replicas"] = len(_replicas(deployment))
        with Load(url, 2) as after:
            _until(lambda: after.ok >= 3, 30)
        seen["ok_after_scale_down"] = after.ok
        seen["ok"], seen["failed"] = load.ok + after.ok, load.failed + after.failed
        mark("done")
        seen["times_s"] = times
        return seen
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            cluster.shutdown()
            shutil.rmtree(temp_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parents[1]))
    print(json.dumps(scenario(sys.argv[1], int(sys.argv[2]))), flush=True)
