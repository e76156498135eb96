"""Gemma 3 against transformers' Gemma3ForCausalLM on a tiny random config.

Contexts stay shorter than the sliding window (tiny_models.GEMMA3_WINDOW), so local layers see
the same keys as global ones; the masking of longer contexts belongs to the attention.
"""

import pytest
import torch

from helios import LLM, EngineConfig, LLMEngine, SamplingParams
from test_model_vs_hf import record_logits
from tiny_models import GEMMA3, GEMMA3_WINDOW

PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 3], list(range(40, 58)), [100, 101, 102, 7]]


def run_and_compare_logits(folder, hf, prompt: list[int], max_tokens: int, **options) -> None:
    engine = LLMEngine(EngineConfig(model=str(folder), kv_cache_memory=1 << 20, dtype="float32", **options))
    seen = record_logits(engine)
    engine.add_request(prompt, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))
    outputs = []
    while engine.has_unfinished():
        outputs = engine.step() or outputs
    tokens = outputs[0].token_ids
    with torch.no_grad():
        ref = hf(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1: len(prompt) - 1 + len(tokens)]
    torch.testing.assert_close(torch.cat(seen), ref, rtol=1e-4, atol=1e-4)


def test_model_declares_windows_and_rope_tables(tiny_model_dir):
    from helios.loader import load_model

    folder, _ = tiny_model_dir("gemma3")
    model = load_model(str(folder), load_tokenizer=False).model
    expected = [GEMMA3_WINDOW if kind == "sliding_attention" else None for kind in GEMMA3["layer_types"]]
    assert [layer.sliding_window for layer in model.layers] == expected == list(model.arch.layer_windows)
    cos, _ = model.rope(torch.arange(3))
    assert cos.shape == (2, 3, 16) and not torch.equal(cos[0], cos[1])  # local and global bases differ


def test_logits_match_transformers_prefill_and_decode(tiny_model_dir):
    folder, hf = tiny_model_dir("gemma3")
    run_and_compare_logits(folder, hf, PROMPTS[2], max_tokens=5)  # 18 + 5 positions < window 32


def test_greedy_equals_generate_for_mixed_batch(tiny_model_dir):
    folder, hf = tiny_model_dir("gemma3")
    outs = LLM(str(folder), kv_cache_memory=1 << 20, dtype="float32").generate(
        PROMPTS, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    for prompt, out in zip(PROMPTS, outs):
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, eos_token_id=None,
                          pad_token_id=0)[0, len(prompt):].tolist()
        assert out.token_ids == ref


@pytest.mark.parametrize("options", [{}, {"max_num_batched_tokens": 16, "block_size": 4}],
                         ids=["whole-prefill", "chunked-prefill"])
def test_context_longer_than_the_window(tiny_model_dir, options):
    """Local layers see the last `window` positions in prefill (whole or chunked) and decode."""
    folder, hf = tiny_model_dir("gemma3")
    run_and_compare_logits(folder, hf, list(range(3, 3 + GEMMA3_WINDOW + 8)), max_tokens=6, **options)
