"""Full depth equals Hugging Face transformers: logits and greedy tokens."""

import pytest
import torch

from helios import LLMEngine, EngineConfig, LLM, SamplingParams

PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 3], list(range(40, 63)), [100, 101, 102, 7]]


def record_logits(engine: LLMEngine) -> list:
    """Wrap the runner so each step's sampled-row logits are kept."""
    seen, run = [], engine.runner.run

    def recording(inputs):
        result = run(inputs)
        seen.append(result.logits.clone())
        return result

    engine.runner.run = recording
    return seen


@pytest.mark.parametrize("arch", ["llama", "llama3", "qwen2", "mistral"])
def test_logits_match_transformers_prefill_and_decode(tiny_model_dir, arch):
    folder, hf = tiny_model_dir(arch)
    engine = LLMEngine(EngineConfig(model=str(folder), kv_cache_memory=1 << 20))
    seen = record_logits(engine)
    prompt = PROMPTS[2]
    engine.add_request(prompt, SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))
    outputs = []
    while engine.has_unfinished():
        outputs = engine.step() or outputs
    tokens = outputs[0].token_ids
    with torch.no_grad():
        full = torch.tensor([prompt + tokens])
        ref = hf(full).logits[0, len(prompt) - 1: len(prompt) - 1 + len(tokens)]
    ours = torch.cat(seen)
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_greedy_equals_generate_for_mixed_batch(tiny_model_dir, arch):
    folder, hf = tiny_model_dir(arch)
    llm = LLM(str(folder), kv_cache_memory=1 << 20)
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))
    for prompt, out in zip(PROMPTS, outs):
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False,
                          eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
        assert out.token_ids == ref
        assert out.exit_layers == [4] * 10  # full depth: every token ran all 4 layers
