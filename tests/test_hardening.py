"""Issue 16 on a real local Serve: limits enforced up front, disconnects free their work, keys and admin routes.

The `served` app has the default limits and no keys; a second app, `hardened` (route prefix
/hardened, one tiny model), has small limits, API keys from a file and the admin routes on.
"""

import asyncio
import json
import threading
import time

import httpx
import pytest

from conftest import ADMIN_KEY, API_KEY
from deployments.config import ConfigError, parse_config


def _engine_state(model_id: str, app: str = "helios") -> dict:
    from ray import serve

    from deployments.app import server_name

    return serve.get_deployment_handle(server_name(model_id), app).engine_state.remote().result()


def _wait_engine_idle(model_id: str, within_s: float, app: str = "helios") -> float:
    """Seconds until the model's engine runs nothing and holds no block (fails after `within_s`)."""
    start = time.monotonic()
    while True:
        state = _engine_state(model_id, app)
        if state["running"] == 0 and state["waiting"] == 0 and state["free_blocks"] == state["num_blocks"]:
            return time.monotonic() - start
        assert time.monotonic() - start < within_s, state
        time.sleep(0.05)


def _is_openai_error(response: httpx.Response, status: int, fragment: str = "") -> bool:
    error = response.json()["error"]
    return (response.status_code == status and set(error) == {"message", "type", "param", "code"}
            and fragment in error["message"])


# ---- limits ---------------------------------------------------------------------------------------

def test_oversized_body_is_refused_by_size_without_stalling_others(served):
    """A 20 MB body gets 413 from its Content-Length, and a chunked one as soon as it passes the limit;
    a short request meanwhile answers as fast as before (the issue measured 44 s with a 50 MB body)."""
    url = served["base_url"] + "/v1/completions"
    short = {"model": "tiny", "prompt": "Hi", "max_tokens": 2}
    huge = json.dumps({"model": "tiny", "prompt": "x" * (20 << 20)}).encode()
    outcome = {}

    def send_huge(name: str, content) -> None:
        try:
            outcome[name] = httpx.post(url, content=content, headers={"content-type": "application/json"},
                                       timeout=60)
        except httpx.HTTPError as exc:  # the server may close while the client is still writing
            outcome[name] = exc

    def chunks():  # no Content-Length: the guard counts bytes as they arrive
        for start in range(0, len(huge), 1 << 20):
            yield huge[start:start + (1 << 20)]

    started = time.monotonic()
    assert httpx.post(url, json=short, timeout=30).status_code == 200
    alone = time.monotonic() - started
    senders = [threading.Thread(target=send_huge, args=("sized", huge)),
               threading.Thread(target=send_huge, args=("chunked", chunks()))]
    for sender in senders:
        sender.start()
    latencies = []
    while any(s.is_alive() for s in senders) or not latencies:
        started = time.monotonic()
        assert httpx.post(url, json=short, timeout=30).status_code == 200
        latencies.append(time.monotonic() - started)
    for sender in senders:
        sender.join()
    for name in ("sized", "chunked"):
        response = outcome[name]
        if isinstance(response, httpx.Response):  # else the connection closed mid-upload: refused too
            assert _is_openai_error(response, 413, "max_body_bytes"), (name, response.text)
    assert isinstance(outcome["sized"], httpx.Response)  # a declared size is refused before the upload ends
    print(f"short request alone {alone:.2f} s; beside two 20 MB bodies: max {max(latencies):.2f} s "
          f"of {len(latencies)}")
    assert max(latencies) < max(3.0, 5 * alone), (alone, latencies)


@pytest.mark.parametrize("body, fragment", [
    ({"prompt": "x", "n": 3}, "n is 3; this server allows at most 2"),
    ({"prompt": "x", "logprobs": 4}, "logprobs is 4"),
    ({"prompt": "x", "stop": ["a", "b", "c"]}, "number of stop strings is 3"),
    ({"prompt": "x", "stop": "abcdefghij"}, "length of a stop string is 10"),
    ({"prompt": "x" * 1001}, "characters is 1001"),
    ({"prompt": ["a", "b", "c", "d"]}, "prompts or messages is 4"),
    ({"prompt": "x", "max_tokens": 51}, "max_tokens is 51"),
    ({"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 51}, "max_tokens is 51"),
    ({"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 4}, "top_logprobs is 4"),
    ({"messages": [{"role": "user", "content": "x"}] * 4}, "prompts or messages is 4"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "y" * 1001}]}]}, "characters is 1001"),
])
def test_request_limits_are_refused_with_400(hardened, body, fragment):
    hardened = hardened["base_url"]
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    response = httpx.post(hardened + path, json={"model": "tiny", **body}, timeout=30,
                          headers={"authorization": f"Bearer {API_KEY}"})
    assert _is_openai_error(response, 400, fragment), response.text
    assert _engine_state("tiny", "hardened")["running"] == 0


def test_max_tokens_beyond_the_context_is_refused_naming_both_numbers(served):
    prompt = [5] * 4090  # tiny's context is 4096 tokens: 6 are left
    response = httpx.post(served["base_url"] + "/v1/completions", timeout=60,
                          json={"model": "tiny", "prompt": prompt, "max_tokens": 100})
    assert _is_openai_error(response, 400, "max_tokens (100) is larger than the 6 tokens the context leaves "
                                           "after the 4090-token prompt"), response.text


def test_truncate_max_tokens_generates_what_fits(served):
    """Opted in (or chat without max_tokens): as many tokens as the context leaves, finish_reason length."""
    url = served["base_url"] + "/v1/completions"
    body = {"model": "tiny", "prompt": [5] * 4090, "max_tokens": 100, "ignore_eos": True, "truncate_max_tokens": True}
    for stream in (False, True):
        response = httpx.post(url, json={**body, "stream": stream, "return_exit_layers": True}, timeout=60)
        assert response.status_code == 200, response.text
        if stream:
            chunks = [json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: {")]
            assert sum(len(c["choices"][0]["exit_layers"]) for c in chunks) == 6
            assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        else:
            assert response.json()["usage"]["completion_tokens"] == 6
            assert response.json()["choices"][0]["finish_reason"] == "length"


def test_within_limits_is_served(hardened):
    hardened = hardened["base_url"]
    response = httpx.post(hardened + "/v1/completions", timeout=30, headers={"authorization": f"Bearer {API_KEY}"},
                          json={"model": "tiny", "prompt": ["a", "b"], "n": 2, "max_tokens": 50, "stop": ["zz"],
                                "logprobs": 3})
    assert response.status_code == 200 and len(response.json()["choices"]) == 4


def test_body_limit_of_the_hardened_app(hardened):
    hardened = hardened["base_url"]
    response = httpx.post(hardened + "/v1/completions", timeout=30, headers={"authorization": f"Bearer {API_KEY}"},
                          json={"model": "tiny", "prompt": "x" * (70 << 10)})
    assert _is_openai_error(response, 413, "65536 bytes"), response.text


# ---- disconnects ----------------------------------------------------------------------------------

def test_non_streaming_client_that_times_out_frees_its_work(served):
    body = {"model": "tiny", "prompt": "Hi", "max_tokens": 3000, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(served["base_url"] + "/v1/completions", json=body, timeout=httpx.Timeout(30, read=1.5))
    took = _wait_engine_idle("tiny", within_s=10)
    assert took < 5, took  # Serve notices the closed connection and cancels; the engine aborts at its next step


def test_non_streaming_client_that_disconnects_frees_its_work(served):
    """Watch the engine: it runs the request, the client goes away, the engine is idle soon after."""
    body = {"model": "tiny", "prompt": "Hi", "max_tokens": 3000, "ignore_eos": True}

    async def go_away() -> None:
        async with httpx.AsyncClient(base_url=served["base_url"], timeout=60) as http:
            request = asyncio.ensure_future(http.post("/v1/completions", json=body))
            deadline = time.monotonic() + 20
            while (await asyncio.to_thread(_engine_state, "tiny"))["running"] == 0:
                assert time.monotonic() < deadline and not request.done()
                await asyncio.sleep(0.05)
            request.cancel()  # closes the connection mid-request

    asyncio.run(go_away())
    assert _wait_engine_idle("tiny", within_s=10) < 5


# ---- access ---------------------------------------------------------------------------------------

def test_api_keys_guard_every_v1_route(hardened):
    hardened = hardened["base_url"]
    for method, path in [("GET", "/v1/models"), ("POST", "/v1/completions"), ("POST", "/v1/chat/completions"),
                         ("GET", "/v1/nothing")]:
        for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": API_KEY}):
            response = httpx.request(method, hardened + path, headers=headers, json={}, timeout=30)
            assert _is_openai_error(response, 401), (path, headers, response.text)
            assert response.json()["error"]["code"] == "invalid_api_key"
    good = httpx.get(hardened + "/v1/models", headers={"authorization": f"Bearer {API_KEY}"}, timeout=30)
    assert good.status_code == 200 and good.headers["x-request-id"]
    assert httpx.get(hardened + "/health", timeout=30).status_code == 200  # open, for load balancers


def test_docs_and_admin_are_off_by_default(served):
    for path in ("/docs", "/redoc", "/openapi.json", "/admin/engine"):
        response = httpx.get(served["base_url"] + path, timeout=30)
        assert response.status_code == 404 and "error" in response.json(), path


def test_admin_routes_take_their_own_key(hardened):
    hardened = hardened["base_url"]
    url = hardened + "/admin/engine"
    for headers in ({}, {"authorization": f"Bearer {API_KEY}"}):  # an API key is not an admin key
        assert _is_openai_error(httpx.get(url, headers=headers, timeout=30), 401)
    response = httpx.get(url, headers={"authorization": f"Bearer {ADMIN_KEY}"}, timeout=30)
    assert response.status_code == 200
    assert set(response.json()["tiny"]) >= {"running", "waiting", "free_blocks", "num_blocks"}


def test_model_sources_confined_to_model_roots(tmp_path):
    inside, outside = tmp_path / "models", tmp_path / "elsewhere"
    (inside / "m").mkdir(parents=True)
    outside.mkdir()
    (inside / "escape").symlink_to(outside)
    assert parse_config({"model_roots": [str(inside)], "models": [{"source": str(inside / "m")}]})
    assert parse_config({"model_roots": [str(inside)], "models": [{"source": "smollm2-135m"}]})  # an alias
    for source in (str(outside), str(inside / ".." / "elsewhere"), str(inside / "escape"), "./m"):
        with pytest.raises(ConfigError, match="outside model_roots"):
            parse_config({"model_roots": [str(inside)], "models": [{"source": source}]})


def test_api_keys_come_from_env_and_file(tmp_path):
    from deployments.auth import key_accepted, load_admin_key, load_api_keys

    keys_file = tmp_path / "keys"
    keys_file.write_text("a1 # first\n\n  b2\n")
    keys = load_api_keys(str(keys_file), {"HELIOS_API_KEYS": "c3, d4,"})
    assert keys == {"a1", "b2", "c3", "d4"}
    assert key_accepted("b2", keys) and not key_accepted("b", keys) and not key_accepted(None, keys)
    assert load_api_keys(None, {}) == frozenset()
    with pytest.raises(ValueError, match="HELIOS_ADMIN_KEY"):
        load_admin_key({})


# ---- load ------------------------------------------------------------------------------------------

def test_small_load_loses_nothing(served):
    """bench/load.py's run, small: 100 Poisson arrivals at 40/s on `tiny-busy` (one request at a time,
    one queued): every request is served or refused early with 503 + Retry-After, none lost or hung."""
    import sys
    from pathlib import Path

    sys.path.append(str(Path(__file__).resolve().parent.parent / "bench"))  # last: bench/controller.py must not hide the controller package
    from load import run_load

    report = asyncio.run(run_load(served["base_url"], "tiny-busy", count=100, rate=40, max_tokens=32,
                                  timeout_s=30))
    print({k: report[k] for k in ("by_status", "latency", "lost", "hung", "rate_per_s")})
    assert report["answered"] == 100 and report["lost"] == 0 and report["hung"] == 0, report
    assert set(report["by_status"]) == {"200", "503"}, report["by_status"]  # overloaded: both happen
    assert report["refused_without_retry_after"] == 0
    assert report["latency"]["503"]["p99_s"] < 5  # refused early, not after queueing
    assert any("LLMServer:tiny-busy" in name for name in report["peak_rss_mib"]), report["peak_rss_mib"]



@pytest.fixture(scope="module")
def bounded(served):
    """A third app, under /bounded: one tiny model with its default queue (64 running + 64 queued) behind
    an ingress that answers at most 4 requests at once (ingress.max_in_flight)."""
    from ray import serve

    from deployments.app import build_app_from_config

    config = parse_config({"models": [{"id": "tiny", "source": str(served["folders"]["tiny"]), "num_cpus": 0,
                                       "engine": {"kv_cache_memory": "16MiB"}}],
                           "ingress": {"max_in_flight": 4, "retry_after_s": 2}})
    serve.run(build_app_from_config(config), name="bounded", route_prefix="/bounded")
    yield served["base_url"] + "/bounded"
    serve.delete("bounded")


def test_requests_past_the_ingress_bound_are_refused_at_once(bounded):
    """With 4 long requests in flight, a burst of 8 more gets 503 + Retry-After (OpenAI's body) while the
    4 still run, though the model's own queue has room: the ingress never holds more than its bound
    (on a busy machine, requests queued 10-40 s there under overload). The 4 complete, and a request
    after them is served: nothing lost, nothing hung."""
    body = {"model": "tiny", "prompt": "Hi", "max_tokens": 500, "ignore_eos": True}

    async def scenario():
        async with httpx.AsyncClient(base_url=bounded, timeout=60) as http:
            long = [asyncio.ensure_future(http.post("/v1/completions", json=body)) for _ in range(4)]
            deadline = time.monotonic() + 20
            while sum(map((await asyncio.to_thread(_engine_state, "tiny", "bounded")).get, ("running", "waiting"))) < 4:
                assert time.monotonic() < deadline and not any(r.done() for r in long)
                await asyncio.sleep(0.05)
            started = time.monotonic()
            burst = await asyncio.gather(*(http.post("/v1/completions", json={**body, "max_tokens": 2})
                                           for _ in range(8)))
            burst_s, long_running = time.monotonic() - started, not any(r.done() for r in long)
            return await asyncio.gather(*long), burst, burst_s, long_running

    long, burst, burst_s, long_running = asyncio.run(scenario())
    print(f"8 requests past the bound answered in {burst_s:.2f} s")
    for response in burst:
        assert _is_openai_error(response, 503, "ingress.max_in_flight"), response.text
        assert response.headers["retry-after"] == "2" and response.json()["error"]["code"] == "queue_full"
    assert long_running and burst_s < 3, burst_s  # refused at once, not after the 4 finished
    assert [r.status_code for r in long] == [200] * 4
    assert all(r.json()["usage"]["completion_tokens"] == 500 for r in long)
    after = httpx.post(bounded + "/v1/completions", json={**body, "max_tokens": 2}, timeout=30)
    assert after.status_code == 200, after.text  # the bound counts requests in flight, not requests ever


def test_ingress_bound_defaults_to_the_models_queues_plus_a_quarter():
    assert parse_config({}).ingress_max_in_flight() == 128 + 32  # one replica, 64 running + 64 queued
    config = parse_config({"ingress": {"replicas": 2}, "models": [
        {"id": "a"}, {"id": "b", "replicas": 2, "max_ongoing_requests": 8, "max_queued_requests": 0},
        {"id": "c", "autoscaling": {"max_replicas": 3}}]})
    assert config.ingress_max_in_flight() == (128 + 2 * 8 + 3 * 128) // 2 * 5 // 4  # shared by 2 replicas
    assert parse_config({"ingress": {"max_in_flight": 7}}).ingress_max_in_flight() == 7


def test_saturation_counts_every_completed_request():
    """bench/load.py's closed loop counts each 200, whichever of its clients got it (`done += await ...`
    once lost the updates of concurrent clients: 2 of 64 counted, the run went at 1/32 of its rate)."""
    import sys
    from pathlib import Path

    sys.path.append(str(Path(__file__).resolve().parent.parent / "bench"))  # last: bench/controller.py must not hide the controller package
    from load import saturation_rate

    async def handler(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(0.01)
        return httpx.Response(200, json={})

    async def main() -> float:
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler), base_url="http://test") as http:
            started = time.monotonic()
            rate = await saturation_rate(http, {}, concurrency=8, requests=32, timeout_s=5)
            return rate * (time.monotonic() - started)

    assert asyncio.run(main()) == pytest.approx(32, rel=0.05)


# ---- faults ----------------------------------------------------------------------------------------

def test_killed_replica_ends_its_streams_cleanly_and_comes_back(served):
    """kill -9 of a model replica (tiny-qwen) mid-stream: each of its streams gets an error event and
    [DONE] (no hang, no finish_reason that would make it look complete), the other models keep
    answering, and new requests succeed once Serve has restarted the replica (the time is printed;
    the test waits for it, so later tests find the model back)."""
    import os
    import signal

    import psutil

    url = served["base_url"] + "/v1/completions"
    body = {"model": "tiny-qwen", "prompt": "Hi", "max_tokens": 3000, "ignore_eos": True, "stream": True}
    streams = [[] for _ in range(3)]

    def read(into: list) -> None:
        with httpx.stream("POST", url, json=body, timeout=30) as response:
            into.extend(line for line in response.iter_lines() if line)

    readers = [threading.Thread(target=read, args=(events,)) for events in streams]
    for reader in readers:
        reader.start()
    deadline = time.monotonic() + 30
    while min(map(len, streams)) < 3:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    [replica] = [p for p in psutil.process_iter(["cmdline"])
                 if (p.info["cmdline"] or [""])[0].startswith("ray::ServeReplica:helios:LLMServer:tiny-qwen")]
    os.kill(replica.pid, signal.SIGKILL)
    killed = time.monotonic()
    for reader in readers:
        reader.join(timeout=30)
        assert not reader.is_alive(), "a stream hung after its replica died"
    for events in streams:
        assert events[-1] == "data: [DONE]"
        assert json.loads(events[-2][6:])["error"]["type"] == "server_error", events[-2]
        assert all(json.loads(e[6:])["choices"][0]["finish_reason"] is None for e in events[:-2]), events[-4:]
    other = httpx.post(url, json={"model": "tiny", "prompt": "Hi", "max_tokens": 2}, timeout=30)
    assert other.status_code == 200  # the other models' replicas are untouched
    while True:
        reply = httpx.post(url, json={"model": "tiny-qwen", "prompt": "Hi", "max_tokens": 2}, timeout=30)
        if reply.status_code == 200:
            break
        assert time.monotonic() - killed < 60, reply.text
        time.sleep(0.5)
    print(f"replica killed mid-stream: new requests succeed again after {time.monotonic() - killed:.1f} s")


# ---- the guard in-process (no Ray): what it logs ---------------------------------------------------

def _guarded_app(settings):
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from deployments.guard import Guard

    async def echo(request):
        return JSONResponse({"got": len(await request.body()), "text": "the model answer"})

    app = Starlette(routes=[Route("/v1/completions", echo, methods=["POST"])])
    app.state.guard = settings
    app.add_middleware(Guard)
    return app


@pytest.mark.parametrize("log_prompts", [False, True])
def test_request_log_has_ids_sizes_and_times_but_text_only_when_asked(log_prompts):
    import logging

    from deployments.guard import GuardSettings, logger

    app = _guarded_app(GuardSettings(max_body_bytes=100, log_prompts=log_prompts))

    async def post(content: bytes):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
            return await http.post("/v1/completions", content=content)

    class Lines(logging.Handler):  # on the logger itself: once Serve runs, "ray.serve" does not propagate
        lines: list[str] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.lines.append(record.getMessage())

    handler, level = Lines(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        ok = asyncio.run(post(b'{"prompt": "secret prompt"}'))
        too_big = asyncio.run(post(b"x" * 101))
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert ok.status_code == 200 and ok.json()["got"] == 27 and too_big.status_code == 413
    first, second = handler.lines
    assert ok.headers["x-request-id"] in first and "status=200 in=27B" in first and "time=" in first
    assert "status=413" in second
    assert ("secret prompt" in first and "the model answer" in first) == log_prompts
    assert log_prompts or ("secret" not in first and "answer" not in first)
