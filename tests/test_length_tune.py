"""length-tune: pairs come from the engine's own generations, and training lowers held-out error."""

import torch

from helios import EngineConfig, LLMEngine, SamplingParams
from helios.length import LengthHeadSpec
from helios.tuning.length_tune import TrainOptions, collect, error_report, spearman, train_head


def test_training_lowers_the_error_on_held_out_pairs():
    # lengths that depend on a direction of the (normalised) state, plus noise
    generator = torch.Generator().manual_seed(0)
    states = torch.randn(600, 32, generator=generator)
    direction = torch.randn(32, generator=generator)
    lengths = (128 + 60 * (states @ direction) / direction.norm() + 5 * torch.randn(600, generator=generator))
    lengths = lengths.round().clamp(1, 256)
    train, test = slice(0, 500), slice(500, 600)
    spec = LengthHeadSpec(hidden_size=32, num_layers=2, layers=[2], cap=256, hidden=32)
    head, fit = train_head(states[train], lengths[train], spec, TrainOptions(hidden=32, epochs=200))
    predicted = torch.tensor(head.predict([states[test]]), dtype=torch.float)
    after = error_report(predicted, lengths[test])
    before = error_report(torch.full((100,), float(lengths[train].median())), lengths[test])
    assert after["mae"] < 0.5 * before["mae"] and after["spearman"] > 0.8
    assert fit["best_epoch"] > 1


def test_spearman_with_ties():
    assert abs(spearman(torch.tensor([1.0, 2, 2, 3]), torch.tensor([10.0, 20, 20, 30])) - 1.0) < 1e-6
    assert abs(spearman(torch.tensor([1.0, 2, 3]), torch.tensor([3.0, 2, 1])) + 1.0) < 1e-6


def test_collect_pairs_each_prompt_with_its_own_generations(tiny_model_dir):
    folder, _ = tiny_model_dir("llama")
    engine = LLMEngine(EngineConfig(model=str(folder), dtype="float32", kv_cache_memory=4 << 20))
    prompts = [[5, 6, 7], [9, 10, 11, 12, 13], [20, 21]]
    data = collect(engine, prompts, layers=[2, 4], max_tokens=6, num_samples=2, temperature=1.0)
    assert data.features.shape == (3, 2 * 64) and data.sampled.shape == (3, 2)
    for i, prompt in enumerate(prompts):  # the greedy label is the greedy generation's length
        engine.add_request(prompt, SamplingParams(max_tokens=6, temperature=0), f"check{i}")
        out = None
        while engine.has_unfinished():
            out = next((o for o in engine.step() if o.finished), out)
        assert data.greedy[i] == out.num_output_tokens
    assert torch.equal(data.labels("max"), data.sampled.max(1).values.float())
    assert engine.length_recorder is None and not engine.runner.capture_layers  # left as found
