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


def test_a_retired_engine_hands_back_only_what_it_has_not_started(tiny_model_dir):
    """One sequence runs at a time: at `retire` one request is running (it finishes here, whole),
    two wait; the one that may be handed off is, the pinned one is served; a later request that
    may be handed off is refused at once, a pinned one is served."""
    import threading

    from helios.async_engine import RequestHandedOff

    folder, _ = tiny_model_dir("llama")
    offline = LLM(str(folder), kv_cache_memory=1 << 20).generate(PROMPTS, GREEDY)
    engine = AsyncLLMEngine(LLMEngine(EngineConfig(model=str(folder), kv_cache_memory=1 << 20, max_num_seqs=1)))
    finished, gate = [], threading.Event()

    def on_step(stats):  # the engine thread holds after each step until the test has queued its requests
        finished.extend(r.finish_reason for r in stats.finished)
        gate.wait(10)

    engine.on_step = on_step

    async def collect(prompt, may_hand_off, started=None):
        tokens = []
        try:
            async for out in engine.generate(prompt, GREEDY, may_hand_off=may_hand_off):
                tokens += out.new_token_ids
                if started is not None:
                    started.set()
        except RequestHandedOff:
            return "handed off"
        return tokens

    async def main():
        started = asyncio.Event()
        running = asyncio.create_task(collect(PROMPTS[0], True, started))
        await started.wait()  # it has run a step; the engine holds
        waiting = [asyncio.create_task(collect(PROMPTS[1], True)), asyncio.create_task(collect(PROMPTS[2], False))]
        while len(engine._queues) < 3:  # both queued (tokenized on the worker thread)
            await asyncio.sleep(0.005)
        engine.retire()
        await asyncio.sleep(0.05)  # the release is queued behind the two adds
        gate.set()
        results = await asyncio.gather(running, *waiting)
        late = await asyncio.gather(collect(PROMPTS[1], True), collect(PROMPTS[1], False))
        return results, late

    (results, late) = asyncio.run(main())
    assert results == [offline[0].token_ids, "handed off", offline[2].token_ids]
    assert late == ["handed off", offline[1].token_ids]
    assert finished.count("handed_off") == 1  # in the stats record, not as an abort
    assert engine.engine.blocks.usage == 0.0 and not engine.engine.has_unfinished()
    engine.shutdown()


def test_release_unstarted_leaves_started_requests(tiny_model_dir):
    """A request preempted after it produced tokens has sent them: it is never released."""
    folder, _ = tiny_model_dir("llama")
    engine = LLMEngine(EngineConfig(model=str(folder), kv_cache_memory=1 << 20, max_num_seqs=1))
    first = engine.add_request(PROMPTS[0], GREEDY)
    second = engine.add_request(PROMPTS[1], GREEDY)
    engine.step()
    engine.scheduler._preempt(first, type(engine.scheduler.schedule())())  # back to waiting, with a token
    assert first.output_ids and first in list(engine.scheduler.waiting)
    assert engine.release_unstarted() == [second.request_id]
    assert engine.release_unstarted() == []
    while engine.has_unfinished():
        engine.step()
    assert len(first.output_ids) == GREEDY.max_tokens
