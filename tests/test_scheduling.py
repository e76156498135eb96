"""Continuous batching, paging and preemption never change what a request generates."""

import pytest

from helios import LLM, LLMEngine, EngineConfig, SamplingParams
from helios.block_manager import kv_bytes_per_token, num_blocks_for_budget

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 3], list(range(40, 70)), [100, 101, 102, 7], [9] * 17]


def alone(folder, prompt, **options):
    return LLM(str(folder), kv_cache_memory=1 << 20, **options).generate([prompt], GREEDY)[0].token_ids


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    folder, _ = tiny_model_dir("llama")
    return [alone(folder, p) for p in PROMPTS]


def test_output_independent_of_batch_company(tiny_model_dir, reference):
    folder, _ = tiny_model_dir("llama")
    outs = LLM(str(folder), kv_cache_memory=1 << 20).generate(PROMPTS, GREEDY)
    assert [o.token_ids for o in outs] == reference


def test_large_mixed_batch_attends_by_length_group_and_matches_one_at_a_time(tiny_model_dir):
    from helios.attention import decode_groups

    # 48 decode rows: their attention runs in 3 groups of 16, each over its own longest context
    assert decode_groups(list(range(1, 49))) == [(0, 16, 16), (16, 32, 32), (32, 48, 48)]
    assert decode_groups([3] * 10) == [(0, 10, 3)]
    folder, _ = tiny_model_dir("llama")
    prompts = [[(7 * i + j) % 120 + 1 for j in range(1 + (i * 37) % 90)] for i in range(48)]
    one_at_a_time = LLM(str(folder), kv_cache_memory=4 << 20, max_num_seqs=1).generate(prompts, GREEDY)
    batched = LLM(str(folder), kv_cache_memory=4 << 20, max_num_seqs=48, block_size=4).generate(prompts, GREEDY)
    assert [o.token_ids for o in batched] == [o.token_ids for o in one_at_a_time]


@pytest.mark.parametrize("block_size", [1, 3, 16, 64])
def test_output_independent_of_block_size(tiny_model_dir, reference, block_size):
    folder, _ = tiny_model_dir("llama")
    outs = LLM(str(folder), kv_cache_memory=1 << 20, block_size=block_size).generate(PROMPTS, GREEDY)
    assert [o.token_ids for o in outs] == reference


def test_chunked_prefill_gives_same_output_and_keeps_decoding(tiny_model_dir, reference):
    folder, _ = tiny_model_dir("llama")
    engine = LLMEngine(EngineConfig(model=str(folder), kv_cache_memory=1 << 20, max_num_batched_tokens=8))
    engine.add_request(PROMPTS[1], GREEDY, "short")
    engine.step()  # the short prompt is decoding now
    engine.add_request(PROMPTS[2], GREEDY, "long")  # 30 tokens: four chunks of <= 8
    short_tokens_while_long_prefills, long_started = 0, False
    done = {}
    while engine.has_unfinished():
        outputs = engine.step()
        long_started = long_started or any(o.request_id == "long" for o in outputs)
        for out in outputs:
            if out.request_id == "short" and not long_started:
                short_tokens_while_long_prefills += 1
            if out.finished:
                done[out.request_id] = out.token_ids
    assert done["short"] == reference[1] and done["long"] == reference[2]
    assert short_tokens_while_long_prefills >= 4  # decoding went on during the long prefill


def test_preemption_recomputes_and_loses_nothing(tiny_model_dir, reference):
    folder, _ = tiny_model_dir("llama")
    # 24 tokens of cache: far too small for five requests at once, enough for any one
    per_token = kv_bytes_per_token(4, 2, 16, 4)
    engine = LLMEngine(EngineConfig(model=str(folder), kv_cache_memory=per_token * 48, block_size=4))
    for i, p in enumerate(PROMPTS):
        engine.add_request(p, GREEDY, str(i))
    done = {}
    while engine.has_unfinished():
        done.update({o.request_id: o for o in engine.step() if o.finished})
    assert engine.stats.preemptions > 0
    assert [done[str(i)].token_ids for i in range(len(PROMPTS))] == reference
    assert engine.blocks.usage == 0.0  # every block came back


def test_half_the_layers_holds_twice_the_blocks(tiny_model_dir):
    folder, _ = tiny_model_dir("llama")
    budget = 1 << 20
    full = LLMEngine(EngineConfig(model=str(folder), kv_cache_memory=budget))
    half = LLMEngine(EngineConfig(model=str(folder), kv_cache_memory=budget, max_layers=2))
    per_token = kv_bytes_per_token(4, 2, 16, 4)  # 4 layers, 2 kv heads of 16 dims, float32
    assert full.blocks.num_blocks == num_blocks_for_budget(budget, 16, per_token) == budget // (16 * per_token)
    assert half.blocks.num_blocks == 2 * full.blocks.num_blocks
    assert half.runner.k_cache.numel() * 4 * 2 <= budget


def test_max_num_seqs_bounds_the_running_batch(tiny_model_dir):
    folder, _ = tiny_model_dir("llama")
    engine = LLMEngine(EngineConfig(model=str(folder), kv_cache_memory=1 << 20, max_num_seqs=2))
    for p in PROMPTS:
        engine.add_request(p, GREEDY)
    while engine.has_unfinished():
        engine.step()
        assert len(engine.scheduler.running) <= 2
