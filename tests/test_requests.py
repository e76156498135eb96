"""Sampling options and bad input."""

import copy
import json

import pytest
import torch

from helios import LLM, LLMEngine, EngineConfig, SamplingParams
from helios.loader import ModelLoadError

PROMPT = [5, 6, 7, 8, 9, 10]


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    folder, _ = tiny_model_dir("llama")
    return LLM(str(folder), kv_cache_memory=1 << 20)


def test_seeded_sampling_is_reproducible_and_top_k_1_is_greedy(llm):
    sampled = SamplingParams(max_tokens=12, temperature=1.5, top_p=0.9, seed=7, ignore_eos=True)
    a, b = llm.generate([PROMPT, PROMPT], sampled)
    assert a.token_ids == b.token_ids
    other = llm.generate([PROMPT], SamplingParams(max_tokens=12, temperature=1.5, seed=8, ignore_eos=True))[0]
    assert other.token_ids != a.token_ids
    greedy = llm.generate([PROMPT], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))[0]
    top1 = llm.generate([PROMPT], SamplingParams(max_tokens=12, temperature=2.0, top_k=1, ignore_eos=True))[0]
    assert top1.token_ids == greedy.token_ids


def test_stop_token_ids_max_tokens_and_logprobs(llm):
    greedy = llm.generate([PROMPT], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))[0]
    stop_at = greedy.token_ids[3]
    first = greedy.token_ids.index(stop_at)
    out = llm.generate([PROMPT], SamplingParams(max_tokens=12, temperature=0, stop_token_ids=[stop_at],
                                                logprobs=3, ignore_eos=True))[0]
    assert out.finish_reason == "stop" and out.token_ids == greedy.token_ids[: first + 1]
    assert len(out.logprobs) == len(out.token_ids)
    assert all(len(lp["top"]) == 3 and lp["logprob"] <= 0 for lp in out.logprobs)
    assert out.logprobs[0]["top"][0][0] == out.token_ids[0]  # greedy picks the top token
    assert greedy.finish_reason == "length" and len(greedy.token_ids) == 12


@pytest.mark.parametrize("options, message", [
    (dict(max_tokens=0), "max_tokens"),
    (dict(max_tokens=-3), "max_tokens"),
    (dict(temperature=-1), "temperature"),
    (dict(top_p=0), "top_p"),
    (dict(logprobs=99), "logprobs"),
])
def test_bad_sampling_params(options, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**options)


def test_bad_requests_leave_others_unaffected(tiny_model_dir):
    folder, _ = tiny_model_dir("llama")
    engine = LLMEngine(EngineConfig(model=str(folder), kv_cache_memory=1 << 20))
    engine.add_request(PROMPT, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True), "good")
    engine.step()
    with pytest.raises(ValueError, match="context is 256 tokens"):
        engine.add_request([3] * 300, SamplingParams(max_tokens=4))
    with pytest.raises(ValueError, match="token ids must be in"):
        engine.add_request([3, 999])
    with pytest.raises(ValueError, match="empty"):
        engine.add_request([])
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request(PROMPT, request_id="good")
    with pytest.raises(ValueError, match="tokenizer"):
        engine.add_request("text needs a tokenizer")
    outs = []
    while engine.has_unfinished():
        outs += engine.step()
    assert [o.request_id for o in outs] == ["good"] * 5 and outs[-1].finished


def test_unknown_model_and_unsupported_architecture(tmp_path):
    with pytest.raises(ModelLoadError, match="unknown model 'no-such-model'"):
        LLM("no-such-model")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ValueError, match="unsupported architecture 'gpt2'"):
        LLM(str(tmp_path))
    with pytest.raises(ModelLoadError, match="config.json is missing"):
        LLM(str(tmp_path / ".."))


def test_max_layers_out_of_range(tiny_model_dir):
    folder, _ = tiny_model_dir("llama")
    with pytest.raises(ModelLoadError, match="model has 4 layers"):
        LLM(str(folder), max_layers=5)


def test_bad_engine_options():
    with pytest.raises(ValueError, match="exit_policy"):
        EngineConfig(exit_policy="sometimes")
    with pytest.raises(ValueError, match="kv_cache_memory"):
        EngineConfig(kv_cache_memory=0)
    with pytest.raises(ValueError, match="dtype"):
        EngineConfig(dtype="int8")


def test_auto_dtype_keeps_float32_checkpoints_and_halves_the_rest(tiny_model_dir):
    from helios.loader import auto_dtype, cpu_runs_bf16

    folder, hf_model = tiny_model_dir("llama")
    config = copy.deepcopy(hf_model.config)
    half_if_native = torch.bfloat16 if cpu_runs_bf16() else torch.float32
    config.dtype = "float32"
    assert auto_dtype(config, quantized=False, device="cpu") == torch.float32
    assert auto_dtype(config, quantized=True, device="cpu") == half_if_native  # GGUF
    assert auto_dtype(config, quantized=False, device="cuda") == torch.bfloat16
    config.dtype = "float16"
    assert auto_dtype(config, quantized=False, device="cpu") == half_if_native
    # the tiny test checkpoints are float32, so engines built on them run float32
    assert LLM(str(folder), kv_cache_memory=1 << 20).engine.model.embed_tokens.weight.dtype == torch.float32


def test_extreme_sampling_values_neither_crash_nor_produce_nan(llm):
    """A temperature that overflows the logits and a top_p that rounds to 0 (found by fuzzing the HTTP API)."""
    greedy = llm.generate([PROMPT], SamplingParams(max_tokens=4, temperature=0))[0]
    tiny_temperature = llm.generate([PROMPT], SamplingParams(max_tokens=4, temperature=2.6e-42))[0]
    assert tiny_temperature.token_ids == greedy.token_ids
    tiny_top_p = llm.generate([PROMPT], SamplingParams(max_tokens=4, temperature=2.0, top_p=1e-300, seed=1))[0]
    assert tiny_top_p.token_ids == greedy.token_ids  # only the most likely token is left to draw
