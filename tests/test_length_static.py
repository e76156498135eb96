"""Static micro-batch mode on a tiny model: documented batch shapes, and FCR never loses a
request (every output equals the unscheduled greedy one)."""

import sys
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parent.parent / "bench"))  # last: bench/controller.py must not hide the controller package

from length_static import fixed_batches, serve_fixed, serve_vbs_fcr, vbs_batches  # noqa: E402

from helios import EngineConfig, LLMEngine  # noqa: E402


def test_grouping_and_vbs_batch_shapes():
    assert fixed_batches([3, 1, 2, 0, 4], 2) == [[3, 1], [2, 0], [4]]
    lengths = [10, 10, 10, 10, 40, 40, 100, 300]
    # budget 80: size x longest <= 80 -> four of 10 (then 40 would make 5 x 40), two of 40, then one each
    assert vbs_batches(list(range(8)), lengths, 80, max_batch=8) == [[0, 1, 2, 3], [4, 5], [6], [7]]
    assert vbs_batches(list(range(4)), lengths, 10_000, max_batch=3) == [[0, 1, 2], [3]]  # max_batch bounds


def test_fcr_recomputes_and_never_loses_a_request(tiny_model_dir):
    folder, _ = tiny_model_dir("llama")
    engine = LLMEngine(EngineConfig(model=str(folder), dtype="float32", kv_cache_memory=4 << 20))
    prompts = [[5 + i, 6, 7 + i, 8] for i in range(6)]
    cap = 10
    plain = serve_fixed(engine, prompts, list(range(6)), batch_size=1, cap=cap)  # one at a time: unscheduled
    true = [len(plain.outputs[i]) for i in range(6)]
    assert sum(t > 1 for t in true) >= 3  # enough room to be wrong
    # predictions: 1 token for those that run longer (they outrun their group), the truth for the rest
    predicted = [1 if t > 1 and i % 2 == 0 else t for i, t in enumerate(true)]
    result = serve_vbs_fcr(engine, prompts, predicted, cap, token_budget=4 * cap, max_batch=3, max_fcr_share=1.0)
    order = sorted(range(6), key=lambda i: predicted[i])
    groups = [order[:3], order[3:]]  # budget 4 x cap, at most 3 a batch
    limits = {i: max(predicted[j] for j in g) for g in groups for i in g}
    expected = sorted(i for i in range(6) if true[i] > limits[i] and limits[i] < cap)
    assert expected and sorted(result.recomputed) == expected, (true, predicted)
    assert result.outputs == plain.outputs  # nothing lost, the same greedy output
    assert result.batch_sizes == [3, 3, len(expected)]  # the groups, then the recomputation
    # a bounded share: with 0 allowed, only the first batch may fail; later ones run to the cap
    bounded = serve_vbs_fcr(engine, prompts, [1] * 6, cap, token_budget=2 * cap, max_batch=2, max_fcr_share=0.0)
    first = [i for i in range(2) if true[i] > 1]
    assert sorted(bounded.recomputed) == first and bounded.outputs == plain.outputs
