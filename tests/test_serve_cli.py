"""`helios serve CONFIG`: starts its own Ray, answers on 127.0.0.1, stops cleanly on Ctrl-C."""

import os
import signal
import subprocess
import sys
import time

import httpx

from conftest import free_port


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
