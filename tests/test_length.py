"""The length head in the engine: file round-trip, predictions made in prefill from the right
states, no extra forward pass, and the prediction carried to sequences, outputs and records."""

import pytest
import torch

from helios import EngineConfig, LLMEngine, SamplingParams
from helios.length import LengthHead, LengthHeadError, LengthHeadSpec, length_features, load_length_head, save_length_head

PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 3], list(range(40, 60)), [100, 101, 102, 7]]
GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)


def random_head(hidden_size=64, num_layers=4, layers=(2, 4), cap=64, seed=0) -> LengthHead:
    torch.manual_seed(seed)
    head = LengthHead(LengthHeadSpec(hidden_size, num_layers, list(layers), cap, hidden=16))
    with torch.no_grad():
        for p in head.parameters():
            p.normal_(0, 0.5)
        head.score.weight.normal_(0, 0.02)
        head.score.bias.fill_(0.5)  # predictions spread around cap / 2
        head.mean.normal_(0, 0.1)
        head.std.uniform_(0.5, 2.0)
    return head.eval()


def test_head_files_round_trip_and_refuse_another_model(tmp_path):
    head = random_head()
    save_length_head(tmp_path, head, extra={"note": "test"})
    loaded = load_length_head(tmp_path, hidden_size=64, num_layers=4)
    states = [torch.randn(5, 64), torch.randn(5, 64)]
    assert loaded.layers == [2, 4] and loaded.spec.cap == 64 and loaded.spec.bucket_edges == head.spec.bucket_edges
    assert loaded.predict(states) == head.predict(states)
    assert all(1 <= p <= 64 for p in loaded.predict(states))
    with pytest.raises(LengthHeadError, match="another model"):
        load_length_head(tmp_path, hidden_size=32, num_layers=4)
    (tmp_path / "length_head.json").write_text('{"format": "other"}')
    with pytest.raises(LengthHeadError, match="format"):
        load_length_head(tmp_path)


def _engine(folder, **options) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(folder), dtype="float32", kv_cache_memory=4 << 20, **options))


def _run(engine: LLMEngine, prompts=PROMPTS):
    """Run to completion; (all outputs by request in order, number of runner.run calls)."""
    calls, run = [0], engine.runner.run

    def counted(inputs):
        calls[0] += 1
        return run(inputs)

    engine.runner.run = counted
    for i, p in enumerate(prompts):
        engine.add_request(p, GREEDY, str(i))
    outputs = {str(i): [] for i in range(len(prompts))}
    records = []
    while engine.has_unfinished():
        for out in engine.step():
            outputs[out.request_id].append(out)
        records += engine.last_step.finished
    return outputs, calls[0], {r.request_id: r for r in records}


def test_engine_predicts_in_prefill_from_the_prompt_states_without_an_extra_pass(tiny_model_dir, tmp_path):
    folder, hf = tiny_model_dir("llama")
    head = random_head()
    save_length_head(tmp_path / "head", head)
    plain_outputs, plain_calls, _ = _run(_engine(folder, max_num_batched_tokens=12))
    engine = _engine(folder, length_head=str(tmp_path / "head"), max_num_batched_tokens=12)  # chunked prefill too
    recorded = {}
    engine.length_recorder = lambda seqs, states: recorded.update(
        {s.request_id: [states[layer][i] for layer in (2, 4)] for i, s in enumerate(seqs)})
    outputs, calls, records = _run(engine)
    # the same tokens, in the same number of forward passes as without the head
    assert calls == plain_calls
    assert [o[-1].token_ids for o in outputs.values()] == [o[-1].token_ids for o in plain_outputs.values()]
    for i, prompt in enumerate(PROMPTS):
        rid = str(i)
        with torch.no_grad():  # the states the head saw are the last prompt token's, at layers 2 and 4
            states = hf(torch.tensor([prompt]), output_hidden_states=True).hidden_states
        torch.testing.assert_close(recorded[rid][0], states[2][0, -1], atol=1e-4, rtol=1e-4)
        expected = head.predict([s[None] for s in recorded[rid]])[0]
        first, last = outputs[rid][0], outputs[rid][-1]
        assert first.predicted_length == expected and last.predicted_length == expected
        assert all(o.predicted_length is None for o in outputs[rid][1:-1])
        assert records[rid].predicted_length == expected
    assert len({r.predicted_length for r in records.values()}) > 1  # not a constant


def test_no_head_no_prediction(tiny_model_dir):
    folder, _ = tiny_model_dir("llama")
    outputs, _, records = _run(_engine(folder), PROMPTS[:2])
    assert all(o.predicted_length is None for outs in outputs.values() for o in outs)
    assert all(r.predicted_length is None for r in records.values())


def test_length_features_are_scale_free():
    x = torch.randn(3, 8)
    torch.testing.assert_close(length_features([x, 10 * x]), torch.cat([length_features([x])] * 2, dim=-1))


def test_a_choice_carries_the_predicted_length_only_when_asked():
    from deployments.responses import ChoiceState

    first = {"text": "a", "exit_layers": [4], "finish_reason": None, "prompt_tokens": 3, "completion_tokens": 1,
             "predicted_length": 42}
    last = {"text": "b", "exit_layers": [4], "finish_reason": "stop", "prompt_tokens": 3, "completion_tokens": 2}
    asked, plain = ChoiceState(0, True, False, False, True), ChoiceState(0, True, False, False)
    for state in (asked, plain):
        state.add(first)
        assert state.chunk(first).get("predicted_length") == (42 if state is asked else None)
        state.add(last)
    assert asked.full()["predicted_length"] == 42 and "predicted_length" not in plain.full()


def test_a_head_reading_layers_that_are_not_loaded_is_refused(tiny_model_dir, tmp_path):
    folder, _ = tiny_model_dir("llama")
    save_length_head(tmp_path, random_head(layers=(2, 4)))
    with pytest.raises(ValueError, match="only 2 are loaded"):
        _engine(folder, length_head=str(tmp_path), max_layers=2)


@pytest.mark.parametrize("kv_tokens", [4096, 32])  # roomy, and tight enough to preempt parked sequences
def test_spf_parks_prefilled_sequences_and_changes_no_token(tiny_model_dir, tmp_path, kv_tokens):
    from helios.block_manager import kv_bytes_per_token

    folder, _ = tiny_model_dir("llama")
    save_length_head(tmp_path / "head", random_head())
    plain_outputs, _, _ = _run(_engine(folder))
    per_token = kv_bytes_per_token(4, 2, 16, 4)  # the tiny llama's KV per token, float32
    engine = LLMEngine(EngineConfig(model=str(folder), dtype="float32", kv_cache_memory=per_token * kv_tokens,
                                    block_size=4, length_head=str(tmp_path / "head"), scheduling_policy="spf",
                                    max_num_seqs=1, length_lookahead=3))
    schedule, most_running, decodes_per_step = engine.scheduler.schedule, [0], []

    def observed():
        batch = schedule()
        most_running[0] = max(most_running[0], len(engine.scheduler.running))
        decodes_per_step.append(sum(chunk.is_decode for chunk in batch.chunks))
        return batch

    engine.scheduler.schedule = observed
    outputs, _, records = _run(engine)
    assert [o[-1].token_ids for o in outputs.values()] == [o[-1].token_ids for o in plain_outputs.values()]
    assert most_running[0] > 1 and max(decodes_per_step) <= 1  # prefilled beyond the one decode slot, parked
    assert engine.blocks.usage == 0.0 and len(records) == len(PROMPTS)
    assert (engine.stats.preemptions > 0) == (kv_tokens == 32)
