"""Sliding-window KV blocks are freed as the window slides (Gemma 3's local layers).

A tiny Gemma 3 with a window of 8 positions and blocks of 4, prompts longer than the window,
prefill in chunks of at most 16 tokens: freeing must change no token (transformers' `generate`
is the reference), a window table stays within its bound, its old blocks go back to the free
list while the sequence still runs, and the same budget holds more full-attention tokens.
"""

import pytest
import torch

from helios import EngineConfig, LLMEngine, SamplingParams
from helios.block_manager import (BlockManager, WindowBlockManager, kv_bytes_per_token, kv_pool_blocks,
                                  num_blocks_for_budget, window_span)
from helios.sampling_params import SamplingParams as Params
from helios.scheduler import SampledToken, Scheduler
from helios.sequence import Sequence
from tiny_models import GEMMA3, build_tiny_model

WINDOW, BLOCK, STEP_TOKENS = 8, 4, 16
PROMPTS = [list(range(3, 23)), list(range(30, 43)), [5, 9, 11, 60, 61, 62, 70, 71, 72, 80], list(range(90, 121))]
MAX_TOKENS = 44
GREEDY = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
LAYER_WINDOWS = [WINDOW if kind == "sliding_attention" else None for kind in GEMMA3["layer_types"]]
PER_LAYER = kv_bytes_per_token(1, 2, GEMMA3["head_dim"], 4)  # one layer's K/V per token: 2 kv heads, float32


@pytest.fixture(scope="module")
def small_window(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gemma3-window8")
    return folder, build_tiny_model(folder, "gemma3", sliding_window=WINDOW)


@pytest.fixture(scope="module")
def reference(small_window):
    _, hf = small_window
    with torch.no_grad():
        return [hf.generate(torch.tensor([p]), max_new_tokens=MAX_TOKENS, do_sample=False, eos_token_id=None,
                            pad_token_id=0)[0, len(p):].tolist() for p in PROMPTS]


def make_engine(folder, engine_class=LLMEngine, **options) -> LLMEngine:
    settings = dict(model=str(folder), dtype="float32", block_size=BLOCK, max_num_batched_tokens=STEP_TOKENS,
                    max_num_seqs=8, kv_cache_memory=1 << 20)
    return engine_class(EngineConfig(**{**settings, **options}))


def check_pool(manager: BlockManager, tables: list[list[int]]) -> None:
    """Every block is either free or in exactly one table."""
    held = [b for table in tables for b in table] + list(manager.free_blocks)
    assert sorted(held) == list(range(manager.num_blocks))


def generate_watching(engine: LLMEngine) -> tuple[dict[str, list[int]], list[tuple[list[int], list[int]]]]:
    """Run PROMPTS to the end, checking both pools after every schedule; (outputs, per step: the
    running sequences' dropped window blocks and the window blocks they hold)."""
    window = engine.window_blocks
    schedule, seen = engine.scheduler.schedule, []

    def watched():
        batch = schedule()
        for chunk in batch.chunks:  # the tables as the step will read them: at their largest
            seq = chunk.seq
            assert len(seq.window_table) <= window_span(WINDOW, chunk.end - chunk.start, BLOCK)
            assert seq.window_dropped + len(seq.window_table) == len(seq.block_table)  # same logical end
            assert seq.window_dropped * BLOCK <= max(0, chunk.start - WINDOW + 1)  # the chunk's keys kept
        running = engine.scheduler.running
        check_pool(engine.blocks, [s.block_table for s in running])
        check_pool(window, [s.window_table for s in running])
        seen.append(([s.window_dropped for s in running], [len(s.window_table) for s in running]))
        return batch

    engine.scheduler.schedule = watched
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(prompt, GREEDY, str(i))
    done = {}
    while engine.has_unfinished():
        done.update({o.request_id: o.token_ids for o in engine.step() if o.finished})
    return done, seen


@pytest.mark.parametrize("policy", ["fcfs", "spf-reserve"])  # spf-reserve reserves in both pools
def test_freeing_window_blocks_changes_no_token(small_window, reference, policy):
    folder, _ = small_window
    engine = make_engine(folder, scheduling_policy=policy)
    assert engine.window_blocks is not None and engine.runner.window_cache is not None
    done, _ = generate_watching(engine)
    assert [done[str(i)] for i in range(len(PROMPTS))] == reference


def test_window_tables_stay_bounded_and_blocks_come_back_while_generating(small_window):
    folder, _ = small_window
    engine = make_engine(folder)
    done, seen = generate_watching(engine)
    assert len(done) == len(PROMPTS)
    # freed during generation, not only at the end: a step where all four run, each having
    # returned blocks, and more returned than held by then
    dropped, held = next((d, h) for d, h in reversed(seen) if len(d) == len(PROMPTS))
    assert min(dropped) > 0 and sum(dropped) > sum(held)
    for manager in (engine.blocks, engine.window_blocks):
        assert manager.usage == 0.0 and sorted(manager.free_blocks) == list(range(manager.num_blocks))
    assert engine.last_step.kv_cache_usage == 0.0


def test_drop_old_frees_exactly_the_blocks_no_query_can_see():
    manager = WindowBlockManager(16, BLOCK, WINDOW)
    seq = Sequence("s", list(range(40)), Params(max_tokens=4))
    for computed in range(1, 41):
        manager.grow(seq, computed)
        seq.num_computed_tokens = computed
        manager.drop_old(seq)
        # the next query, at position `computed`, sees computed - WINDOW + 1 ..: that block is kept
        first_needed = max(0, computed - WINDOW + 1)
        assert seq.window_dropped == first_needed // BLOCK
    assert len(seq.window_table) <= window_span(WINDOW, 1, BLOCK)
    manager.free(seq)
    assert (seq.window_table, seq.window_dropped, manager.usage) == ([], 0, 0.0)


def test_running_out_of_the_window_pool_preempts_and_frees_both_tables():
    """Two short prompts fit the window pool, two full windows do not: one sequence is preempted
    (its blocks of both pools freed) and recomputed once the other has finished."""
    blocks, window = BlockManager(64, BLOCK), WindowBlockManager(5, BLOCK, WINDOW)  # a window needs 3 blocks
    scheduler = Scheduler(blocks, max_num_seqs=4, max_num_batched_tokens=64, window_blocks=window)
    a, b = (Sequence(name, [1, 2, 3, 4], Params(max_tokens=30)) for name in "ab")
    scheduler.add(a), scheduler.add(b)
    preempted, steps = 0, 0
    while scheduler.has_work():
        batch = scheduler.schedule()
        preempted += len(batch.preempted)
        for victim in batch.preempted:
            assert (victim.block_table, victim.window_table, victim.window_dropped) == ([], [], 0)
        sampled = [SampledToken(c.seq, 7, 1, None, "length" if len(c.seq.output_ids) + 1 == 30 else None)
                   for c in batch.chunks if c.sample]
        scheduler.update(batch, sampled, now=1.0)
        steps += 1
        assert steps < 500
    assert preempted > 0 and len(a.output_ids) == len(b.output_ids) == 30
    assert blocks.usage == window.usage == 0.0


def test_two_pools_hold_more_full_attention_tokens(small_window, reference):
    """One budget: one pool holds 160 tokens of every layer; with the window layers' blocks freed
    as they slide, the full layer's pool holds several times more, and the batch that makes the
    one-pool engine preempt runs without a preemption (same tokens)."""
    folder, _ = small_window
    max_num_seqs, budget = 4, 160 * PER_LAYER * len(LAYER_WINDOWS)
    num_window = sum(w is not None for w in LAYER_WINDOWS)
    one_pool = num_blocks_for_budget(budget, BLOCK, PER_LAYER * len(LAYER_WINDOWS))
    window_blocks = max_num_seqs * (-(-WINDOW // BLOCK) + 2) + -(-STEP_TOKENS // BLOCK)  # every slot, one step
    full_blocks = (budget - window_blocks * BLOCK * PER_LAYER * num_window) // (BLOCK * PER_LAYER)
    assert kv_pool_blocks(budget, BLOCK, PER_LAYER, LAYER_WINDOWS, max_num_seqs, STEP_TOKENS) == (full_blocks,
                                                                                                   window_blocks)
    assert kv_pool_blocks(budget, BLOCK, PER_LAYER, [None] * 4) == (one_pool, 0)  # as the controller counts

    engine = make_engine(folder, kv_cache_memory=budget, max_num_seqs=max_num_seqs)
    assert (engine.blocks.num_blocks, engine.window_blocks.num_blocks) == (full_blocks, window_blocks)
    assert full_blocks * BLOCK > 2 * one_pool * BLOCK  # tokens of context the budget holds
    needed = sum(len(p) + MAX_TOKENS for p in PROMPTS)
    assert one_pool * BLOCK < needed <= full_blocks * BLOCK

    class OnePool(LLMEngine):  # every layer in one pool, nothing freed: as before the window pool
        def _block_managers(self, dtype_bytes):
            return BlockManager(one_pool, BLOCK), None

    single = make_engine(folder, OnePool, kv_cache_memory=budget, max_num_seqs=max_num_seqs)
    for runner in (single, engine):
        for i, prompt in enumerate(PROMPTS):
            runner.add_request(prompt, GREEDY, str(i))
        done = {}
        while runner.has_unfinished():
            done.update({o.request_id: o.token_ids for o in runner.step() if o.finished})
        assert [done[str(i)] for i in range(len(PROMPTS))] == reference
    assert single.stats.preemptions > 0 and engine.stats.preemptions == 0


def test_a_budget_too_small_for_every_window_splits_evenly():
    """Both pools then hold the same tokens: the one-pool capacity, never fewer window tokens."""
    budget = 40 * PER_LAYER * len(LAYER_WINDOWS)
    even = num_blocks_for_budget(budget, BLOCK, PER_LAYER * len(LAYER_WINDOWS))
    assert kv_pool_blocks(budget, BLOCK, PER_LAYER, LAYER_WINDOWS, num_seqs=64, step_tokens=2048) == (even, even)


def test_models_without_window_layers_keep_one_pool(tiny_model_dir):
    folder, _ = tiny_model_dir("llama")
    engine = LLMEngine(EngineConfig(model=str(folder), kv_cache_memory=1 << 20))
    assert engine.window_blocks is None and engine.runner.window_cache is None
    assert engine.scheduler.window_blocks is None
    assert engine.runner.k_cache.shape[0] == 4  # every layer in the one cache
