"""`helios serve CONFIG`: starts its own Ray, answers on 127.0.0.1, stops cleanly on Ctrl-C."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from conftest import free_port


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


def test_helios_serve_answers_and_stops_on_ctrl_c(tmp_path, tiny_chat_model_dir):
    port = free_port()
    config = tmp_path / "serve.yaml"
    config.write_text(f"http: {{host: 127.0.0.1, port: {port}}}\nmetrics_export_port: {free_port()}\n"
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
        # the HTTP processes step back to ingress.niceness (19) so they use the CPU the engine leaves idle
        assert _niceness_under(process.pid, b"ServeReplica:helios:LLMServer") == [0]
        assert _niceness_under(process.pid, b"ServeReplica:helios:OpenAIIngress") == [19]
        assert _niceness_under(process.pid, b"ray::ProxyActor") == [19]
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=60) == 0
        assert "shutting down" in (tmp_path / "serve.log").read_text()
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
