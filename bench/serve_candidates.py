"""Every candidate behind one endpoint: start `helios serve CONFIG`, ask each model one question
through the official `openai` client, record time to ready, the replies and each replica's
memory, then stop the server with Ctrl-C (SIGINT) and check it exits.

    python bench/serve_candidates.py --config deployments/configs/candidates.yaml \
        --json bench/results/serve_candidates.json
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine  # noqa: E402

QUESTION = "What is the capital of France? Answer in one sentence."
CODE = "Write a Python function that returns the sum of two numbers."


def wait_ready(base: str, models: int, deadline_s: float, server: subprocess.Popen) -> float:
    """Seconds until /health lists every model and each answers /v1/models (replicas up)."""
    started = time.monotonic()
    while time.monotonic() - started < deadline_s:
        if server.poll() is not None:
            raise RuntimeError(f"helios serve exited with {server.returncode}")
        try:
            reply = httpx.get(f"{base}/v1/models", timeout=30)
            if reply.status_code == 200 and len(reply.json()["data"]) == models:
                return time.monotonic() - started
        except httpx.HTTPError:
            pass
        time.sleep(2)
    raise TimeoutError(f"not ready after {deadline_s:.0f} s")


def ask(client, model: str, prompt: str, max_tokens: int) -> dict:
    """Chat; a model without a chat template (a 400 that says so) gets the question as plain text."""
    import openai

    started, route = time.monotonic(), "chat"
    try:
        reply = client.chat.completions.create(model=model, max_tokens=max_tokens, temperature=0,
                                               messages=[{"role": "user", "content": prompt}])
        text = reply.choices[0].message.content
    except openai.BadRequestError as exc:
        if "no chat template" not in str(exc):
            raise
        route, prompt = "completions", f"Question: {prompt}\nAnswer:"
        reply = client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0)
        text = reply.choices[0].text
    return {"model": model, "route": route, "prompt": prompt, "reply": text,
            "completion_tokens": reply.usage.completion_tokens, "seconds": round(time.monotonic() - started, 2)}


def replica_rss_mib() -> dict[str, float]:
    """RSS of each model replica process (Ray names them ServeReplica:helios:LLMServer:<model>)."""
    out = subprocess.run(["ps", "-eo", "rss=,args="], capture_output=True, text=True).stdout
    rows = {}
    for line in out.splitlines():
        rss, _, args = line.strip().partition(" ")
        if "LLMServer:" in args and "ServeReplica" in args:
            rows[args.split("LLMServer:")[-1].split()[0]] = round(int(rss) / 1024, 1)
    return rows


def main() -> None:
    from openai import OpenAI

    from deployments.config import load_config

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="deployments/configs/candidates.yaml")
    parser.add_argument("--port", type=int, default=8123, help="overrides the config's http.port")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--ready-timeout", type=float, default=1200)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    config = load_config(args.config)
    base = f"http://{config.http.host}:{args.port}"
    # the server's output goes to a file: a pipe nobody reads fills up and blocks the server
    log = tempfile.NamedTemporaryFile("w+", prefix="helios-serve-", suffix=".log", delete=False)
    server = subprocess.Popen([sys.executable, "-m", "helios.cli", "serve", args.config, "--port", str(args.port)],
                              stdout=log, stderr=subprocess.STDOUT, text=True)
    result = {"command": " ".join(sys.argv), "machine": machine(), "load_average": os.getloadavg(),
              "date": time.strftime("%Y-%m-%d"), "models": [m.id for m in config.models]}
    try:
        result["ready_s"] = round(wait_ready(base, len(config.models), args.ready_timeout, server), 1)
        print(f"ready after {result['ready_s']} s", flush=True)
        client = OpenAI(base_url=f"{base}/v1", api_key="unused", timeout=600)
        result["replies"] = []
        for model in config.models:
            prompt = CODE if "coder" in model.id else QUESTION
            result["replies"].append(ask(client, model.id, prompt, args.max_tokens))
            print(json.dumps(result["replies"][-1]), flush=True)
        result["replica_rss_mib"] = replica_rss_mib()
    finally:
        stop_started = time.monotonic()
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=120)
        except subprocess.TimeoutExpired:
            server.kill()
        result["stop_s"] = round(time.monotonic() - stop_started, 1)
        result["exit_code"] = server.returncode
        result["server_log_tail"] = Path(log.name).read_text()[-1500:]
        if "replies" not in result:
            print(result["server_log_tail"], flush=True)
    print(f"stopped in {result['stop_s']} s, exit code {result['exit_code']}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
