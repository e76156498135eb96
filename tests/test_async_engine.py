"""The asyncio front: concurrent streams, deltas, abort frees blocks."""

import asyncio

import pytest

from helios import LLM, LLMEngine, EngineConfig, SamplingParams
from helios.async_engine import AsyncLLMEngine

GREEDY = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 3], list(range(40, 60))]


def test_concurrent_streams_equal_offline_and_abort_frees_blocks(tiny_model_dir):
    folder, _ = tiny_model_dir("llama")
    offline = LLM(str(folder), kv_cache_memory=1 << 20).generate(PROMPTS, GREEDY)
    engine = AsyncLLMEngine(LLMEngine(EngineConfig(model=str(folder), kv_cache_memory=1 << 20)))

    async def collect(prompt):
        tokens = []
        async for out in engine.generate(prompt, GREEDY):
            tokens += out.new_token_ids
            final = out
        assert final.finished and final.token_ids == tokens
        return tokens

    async def abandon(prompt):
        async for out in engine.generate(prompt, SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)):
            if out.num_output_tokens >= 3:
                break  # like a client that disconnects

    async def main():
        results = await asyncio.gather(*(collect(p) for p in PROMPTS), abandon(PROMPTS[0]))
        for _ in range(100):  # the abort is applied between steps
            if not engine.engine.has_unfinished():
                break
            await asyncio.sleep(0.01)
        return results

    results = asyncio.run(main())
    assert results[:3] == [o.token_ids for o in offline]
    assert engine.engine.blocks.usage == 0.0 and not engine.engine.has_unfinished()


def test_bad_request_raises_before_queueing(tiny_model_dir):
    folder, _ = tiny_model_dir("llama")
    engine = AsyncLLMEngine(LLMEngine(EngineConfig(model=str(folder), kv_cache_memory=1 << 20)))

    async def main():
        with pytest.raises(ValueError, match="context"):
            async for _ in engine.generate([3] * 300, GREEDY):
                pass
        return [o async for o in engine.generate(PROMPTS[0], GREEDY)][-1]

    assert asyncio.run(main()).finished
