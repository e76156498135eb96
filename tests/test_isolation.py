"""A fault in one request's own processing (sampling, detokenization, stop checks) ends that
request alone with finish_reason "error": its blocks are freed, the other requests in the batch
get the tokens they would have had, and the engine serves new requests. A fault of the forward
pass (the whole batch's) still fails the step."""

import asyncio
import json
from unittest.mock import ANY

import httpx
import pytest

import helios.engine as engine_module
from helios import EngineConfig, LLMEngine, SamplingParams
from helios.async_engine import AsyncLLMEngine, RequestFailed

PROMPTS = {"a": [5, 6, 7, 8, 9, 10], "bad": [11, 3, 4], "c": list(range(40, 60)), "d": [20, 21]}
GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
SEEDED = SamplingParams(max_tokens=8, temperature=0.9, top_p=0.9, seed=7, ignore_eos=True, logprobs=2)


def _engine(folder) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(folder), kv_cache_memory=1 << 20))


def _run(engine: LLMEngine, params: dict[str, SamplingParams], max_steps: int = 200) -> dict:
    """Every request to its end: {request id: finishing output}."""
    for request_id, prompt in PROMPTS.items():
        engine.add_request(prompt, params[request_id], request_id)
    finished = {}
    for _ in range(max_steps):
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
        if not engine.has_unfinished():
            return finished
    raise AssertionError("the engine did not finish within the step bound")


def _fails_for_bad_at(after_tokens: int, original):
    """A stand-in for `original(seq, ...)` that raises for request "bad" once it has `after_tokens` tokens."""
    def wrapped(seq, *args):
        if seq.request_id == "bad" and len(seq.output_ids) == after_tokens:
            raise RuntimeError("injected fault")
        return original(seq, *args)
    return wrapped


def _assert_same_logprobs(got: list[dict] | None, want: list[dict] | None) -> None:
    """Same tokens, same values up to float noise (a smaller batch rounds the matmuls differently)."""
    assert (got is None) == (want is None)
    for g, w in zip(got or [], want or []):
        assert g["token_id"] == w["token_id"] and g["logprob"] == pytest.approx(w["logprob"], abs=1e-4)
        assert [t for t, _ in g["top"]] == [t for t, _ in w["top"]]
    assert len(got or []) == len(want or [])


def _assert_isolated(engine: LLMEngine, params: dict, faulty: dict, clean: dict, after_tokens: int) -> None:
    bad = faulty["bad"]
    assert bad.finish_reason == "error" and "injected fault" in bad.error
    assert bad.token_ids == clean["bad"].token_ids[:after_tokens]  # what it had made before the fault
    for request_id in ("a", "c", "d"):
        assert faulty[request_id].finish_reason == "length"
        assert faulty[request_id].token_ids == clean[request_id].token_ids
        _assert_same_logprobs(faulty[request_id].logprobs, clean[request_id].logprobs)
    assert engine.blocks.usage == 0.0 and not engine.scheduler.running and not engine.sequences
    # and the engine serves new requests
    engine.add_request(PROMPTS["a"], params["a"], "after")
    for _ in range(50):
        done = [out for out in engine.step() if out.finished]
        if done:
            assert done[0].token_ids == clean["a"].token_ids
            return
    raise AssertionError("the request after the fault did not finish")


def test_detokenizer_fault_ends_only_its_request(tiny_chat_model_dir, monkeypatch):
    engine = _engine(tiny_chat_model_dir("llama"))
    params = {"a": GREEDY, "bad": GREEDY, "c": SEEDED, "d": GREEDY}
    clean = _run(engine, params)
    monkeypatch.setattr(engine.outputs, "process", _fails_for_bad_at(3, engine.outputs.process))
    faulty = _run(engine, params)
    assert faulty["bad"].text == clean["bad"].text[:len(faulty["bad"].text)]  # the text sent before the fault
    _assert_isolated(engine, params, faulty, clean, 3)


def test_sampler_fault_ends_only_its_request_and_keeps_seeded_draws(tiny_model_dir, monkeypatch):
    """The batch's sample call raises; the rows are sampled again one by one, seeded generators
    put back first, so the seeded requests draw exactly what they would have without the fault."""
    engine = _engine(tiny_model_dir("llama")[0])
    params = {"a": SEEDED, "bad": SEEDED, "c": SamplingParams(**{**SEEDED.__dict__, "seed": 8}), "d": GREEDY}
    clean = _run(engine, params)
    original = engine_module.sample

    def sample(logits, seqs):
        tokens, logprobs = original(logits, seqs)  # draws first, as a fault late in the call would
        if any(s.request_id == "bad" and len(s.output_ids) == 2 for s in seqs):
            raise ValueError("injected fault in sampling")
        return tokens, logprobs

    monkeypatch.setattr(engine_module, "sample", sample)
    faulty = _run(engine, params)
    assert "ValueError: injected fault" in faulty["bad"].error
    monkeypatch.setattr(engine_module, "sample", original)
    _assert_isolated(engine, params, faulty, clean, 2)


def test_forward_pass_fault_still_fails_the_step(tiny_model_dir, monkeypatch):
    engine = _engine(tiny_model_dir("llama")[0])
    engine.add_request([5, 6, 7], GREEDY, "x")
    engine.add_request([8, 9], GREEDY, "y")

    def broken(inputs):
        raise RuntimeError("injected forward fault")

    monkeypatch.setattr(engine.runner, "run", broken)
    with pytest.raises(RuntimeError, match="forward fault"):
        engine.step()


def test_a_fault_in_every_row_is_not_attributed(tiny_model_dir, monkeypatch):
    engine = _engine(tiny_model_dir("llama")[0])
    engine.add_request([5, 6, 7], GREEDY, "x")
    engine.add_request([8, 9], GREEDY, "y")

    def broken(logits, seqs):
        raise RuntimeError("injected batch-wide fault")

    monkeypatch.setattr(engine_module, "sample", broken)
    with pytest.raises(RuntimeError, match="batch-wide"):
        engine.step()


def test_async_engine_delivers_the_fault_to_its_request_only(tiny_chat_model_dir, monkeypatch):
    engine = _engine(tiny_chat_model_dir("llama"))
    front = AsyncLLMEngine(engine)
    monkeypatch.setattr(engine.outputs, "process", _fails_for_bad_at(2, engine.outputs.process))

    async def collect(request_id):
        tokens = []
        async for out in front.generate(PROMPTS[request_id], GREEDY, request_id=request_id):
            tokens += out.new_token_ids
        return tokens

    async def main():
        results = await asyncio.wait_for(
            asyncio.gather(*(collect(r) for r in PROMPTS), return_exceptions=True), 30)
        after = await asyncio.wait_for(collect("a"), 30)  # the same id again, once it has ended
        return results, after

    try:
        (a, bad, c, d), after = asyncio.run(main())
    finally:
        front.shutdown()
    assert isinstance(bad, RequestFailed) and "injected fault" in str(bad)
    assert all(len(tokens) == GREEDY.max_tokens for tokens in (a, c, d))
    assert after == a
    assert front.failed is None and engine.blocks.usage == 0.0 and not engine.has_unfinished()


# ---- over HTTP ------------------------------------------------------------------------------------

FAULTY_MAX_TOKENS = 7  # the injected fault hits requests with this max_tokens, at their third token


@pytest.fixture(scope="module")
def faulty_app(served):
    """A Serve app beside `served`, under /faulty: one tiny model whose replica's output processing
    raises for requests with max_tokens == FAULTY_MAX_TOKENS (the class is defined here, so Ray
    pickles it by value into the replica)."""
    from ray import serve

    from deployments.app import server_name
    from deployments.config import parse_config
    from deployments.ingress import OpenAIIngress
    from deployments.llm_server import LLMServer

    class FaultyServer(LLMServer.func_or_class):
        def __init__(self, model):
            super().__init__(model)
            process = self.engine.engine.outputs.process

            def faulty(seq, *args):
                if seq.params.max_tokens == FAULTY_MAX_TOKENS and len(seq.output_ids) == 2:
                    raise RuntimeError("injected fault")
                return process(seq, *args)

            self.engine.engine.outputs.process = faulty

    config = parse_config({"models": [{"id": "tiny", "source": str(served["folders"]["tiny"]), "num_cpus": 0,
                                       "engine": {"kv_cache_memory": "16MiB"}}]})
    server = serve.deployment(FaultyServer).options(name=server_name("tiny"), ray_actor_options={"num_cpus": 0})
    ingress = OpenAIIngress.options(ray_actor_options={"num_cpus": 0}).bind({"tiny": server.bind(config.models[0])},
                                                                            config)
    serve.run(ingress, name="faulty", route_prefix="/faulty")
    yield served["base_url"] + "/faulty"
    serve.delete("faulty")


def _sse(response) -> list:
    """The events of a streamed response: dicts, then the string "[DONE]"."""
    events = [line[len("data: "):] for line in response.text.splitlines() if line.startswith("data: ")]
    return [e if e == "[DONE]" else json.loads(e) for e in events]


def test_http_fault_ends_only_its_request(faulty_app):
    from ray import serve

    from deployments.app import server_name

    body = {"model": "tiny", "prompt": "hello there", "temperature": 0, "ignore_eos": True}
    good = {**body, "max_tokens": 12}
    bad = {**body, "max_tokens": FAULTY_MAX_TOKENS}

    async def main():
        async with httpx.AsyncClient(base_url=faulty_app, timeout=60) as http:
            return await asyncio.gather(http.post("/v1/completions", json=good),
                                        http.post("/v1/completions", json={**good, "stream": True}),
                                        http.post("/v1/completions", json=bad),
                                        http.post("/v1/completions", json={**bad, "stream": True}),
                                        http.post("/v1/completions", json={**good, "stream": True}))

    plain, streamed, bad_plain, bad_streamed, streamed_again = asyncio.run(main())
    # the faulty request: a 500 with OpenAI's error body; streamed: an error event, then [DONE]
    assert bad_plain.status_code == 500, bad_plain.text
    error = bad_plain.json()["error"]
    assert error["type"] == "server_error" and "injected fault" in error["message"]
    assert "Traceback" not in error["message"]
    events = _sse(bad_streamed)
    assert events[-1] == "[DONE]" and "injected fault" in events[-2]["error"]["message"]
    assert all(c["finish_reason"] is None for e in events[:-2] for c in e["choices"])  # never looked finished
    # the others: whole answers
    assert plain.status_code == 200 and plain.json()["choices"][0]["finish_reason"] == "length"
    assert plain.json()["usage"]["completion_tokens"] == 12
    for response in (streamed, streamed_again):
        events = _sse(response)
        assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] == "length"
        assert "".join(e["choices"][0]["text"] for e in events[:-1]) == plain.json()["choices"][0]["text"]
    # the replica stays healthy, holds nothing, and serves the next request
    state = serve.get_deployment_handle(server_name("tiny"), "faulty").engine_state.remote().result()
    assert state["running"] == state["waiting"] == 0 and state["free_blocks"] == state["num_blocks"]
    assert httpx.post(faulty_app + "/v1/completions", json=good, timeout=60).json() == {
        **plain.json(), "id": ANY, "created": ANY}
