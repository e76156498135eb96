"""`helios serve CONFIG`: starts its own Ray, answers on 127.0.0.1, stops cleanly on Ctrl-C."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil

from conftest import free_port
from deployments.config import IngressConfig


def _niceness_under(root: int, title: bytes) -> list[int]:
    """Niceness of the descendants of `root` whose process title contains `title` (Linux /proc)."""
    table = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # state, ppid, ... nice at index 16
            table[int(stat.parent.name)] = (int(fields[1]), int(fields[16]), (stat.parent / "cmdline").read_bytes())
        except (OSError, ValueError, IndexError):  # a process that just ended
            continue

    def descends(pid: int) -> bool:
        while pid in table and pid != root:
            pid = table[pid][0]
        return pid == root

    return [nice for pid, (_, nice, cmdline) in table.items() if title in cmdline and descends(pid)]


def _stream_events(url: str, body: dict, into: list) -> None:
    """Collect a streamed response's events (or the exception that ended it) into `into`."""
    try:
        with httpx.stream("POST", url, json=body, timeout=60) as response:
            into.append(response.status_code)
            into.extend(line for line in response.iter_lines() if line)
    except httpx.HTTPError as exc:
        into.append(exc)


def _listening_addresses(port: int) -> set[str]:
    return {c.laddr.ip for c in psutil.net_connections("tcp") if c.status == "LISTEN" and c.laddr.port == port}


def _shut_down_with_requests_in_flight(process: subprocess.Popen, url: str, log: Path) -> None:
    """Ctrl-C with a short and two long streams in flight: the short one finishes within the grace
    period, the long ones end with an error event and [DONE], new requests are refused, the process
    exits and every process it started (Ray's too) is gone."""
    children = process_tree(process.pid)
    assert len(children) > 3  # Ray's GCS, raylet, workers...
    short, long_a, long_b = [], [], []
    body = {"model": "tiny", "prompt": "Hi", "stream": True, "ignore_eos": True}
    threads = [threading.Thread(target=_stream_events, args=(url, {**body, "max_tokens": n}, into))
               for n, into in ((8, short), (4000, long_a), (4000, long_b))]  # 8: done well within the grace, even under load
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 30
    while len(long_a) < 3 or len(long_b) < 3:  # both long streams are generating
        assert time.monotonic() < deadline, (long_a[:3], long_b[:3])
        time.sleep(0.05)
    started = time.monotonic()
    process.send_signal(signal.SIGINT)
    while "shutting down" not in log.read_text():
        assert time.monotonic() - started < 10
        time.sleep(0.05)
    health = url.replace("/v1/completions", "/health")
    while httpx.get(health, timeout=10).status_code != 503:  # draining: load balancers see it at once
        assert time.monotonic() - started < 10
        time.sleep(0.05)
    late = httpx.post(url, json={"model": "tiny", "prompt": "Hi", "max_tokens": 2}, timeout=30)
    assert late.status_code == 503 and late.json()["error"]["code"] == "shutting_down"
    assert late.headers["retry-after"] == "1"
    assert process.wait(timeout=60) == 0
    took = time.monotonic() - started
    for thread in threads:
        thread.join(timeout=10)
    assert short[0] == 200 and short[-1] == "data: [DONE]"
    assert json.loads(short[-2][6:])["choices"][0]["finish_reason"] == "length"
    for events in (long_a, long_b):
        assert events[0] == 200 and events[-1] == "data: [DONE]", events[-3:]
        assert json.loads(events[-2][6:])["error"]["code"] == "shutting_down"
    print(f"shutdown with 2 long streams in flight and a 2 s grace period took {took:.1f} s")
    assert took < 2 + 20, log.read_text()
    deadline = time.monotonic() + 10  # Ray's processes may take a moment after the driver exits
    while (alive := [p for p in children if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]):
        assert time.monotonic() < deadline, [p.cmdline()[:2] for p in alive]
        time.sleep(0.2)


def process_tree(pid: int) -> list[psutil.Process]:
    return psutil.Process(pid).children(recursive=True)


def test_helios_serve_answers_and_stops_on_ctrl_c(tmp_path, tiny_chat_model_dir):
    port, metrics_port = free_port(), free_port()
    config = tmp_path / "serve.yaml"
    config.write_text(f"http: {{host: 127.0.0.1, port: {port}}}\nmetrics_export_port: {metrics_port}\n"
                      f"ingress: {{shutdown_grace_s: 2}}\n"
                      f"models:\n  - id: tiny\n    source: {tiny_chat_model_dir('llama')}\n    num_cpus: 0\n"
                      f"    engine: {{kv_cache_memory: 16MiB}}\n")
    log = open(tmp_path / "serve.log", "w+")
    process = subprocess.Popen([sys.executable, "-m", "helios.cli", "serve", str(config)], stdout=log,
                               stderr=subprocess.STDOUT, env={**os.environ, "RAY_ADDRESS": ""})
    try:
        deadline = time.monotonic() + 120
        while "Helios is serving" not in (tmp_path / "serve.log").read_text():
            assert process.poll() is None and time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
            time.sleep(0.5)
        reply = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=30,
                           json={"model": "tiny", "prompt": "Hello", "max_tokens": 3})
        assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 3
        # the engine's replica runs at nice 0, not Ray's default 15 (which starves it beside any client);
        # the HTTP processes step back to ingress.niceness (default 5) so an engine beside them keeps the CPU
        niceness = IngressConfig().niceness
        assert _niceness_under(process.pid, b"ServeReplica:helios:LLMServer") == [0]
        assert _niceness_under(process.pid, b"ServeReplica:helios:OpenAIIngress") == [niceness]
        assert _niceness_under(process.pid, b"ray::ProxyActor") == [niceness]
        # HTTP on 127.0.0.1, so Ray's metrics endpoint listens there too, not on every interface
        assert _listening_addresses(metrics_port) == {"127.0.0.1"}
        _shut_down_with_requests_in_flight(process, f"http://127.0.0.1:{port}/v1/completions", tmp_path / "serve.log")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_helios_serve_rejects_a_bad_config(tmp_path):
    config = tmp_path / "serve.yaml"
    config.write_text("models:\n  - id: a\n    engine: {max_layer: 3}\n")
    result = subprocess.run([sys.executable, "-m", "helios.cli", "serve", str(config)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2
    assert "models.0.engine.max_layer" in result.stderr and "Traceback" not in result.stderr
