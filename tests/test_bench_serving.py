"""bench/serving.py's policy comparison on a tiny chat model: every request of every policy is
answered, the oracle sees true lengths (prediction error 0), and the ratios are computed per rate."""

import argparse
import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_length import random_head  # noqa: E402

from helios.length import save_length_head  # noqa: E402


def test_compare_policies_answers_everything_and_the_oracle_knows_lengths(tiny_chat_model_dir, tmp_path):
    import serving

    save_length_head(tmp_path / "head", random_head())
    args = argparse.Namespace(source=str(tiny_chat_model_dir("llama")), kv_cache_memory=4 << 20, max_num_seqs=2,
                              length_head=str(tmp_path / "head"), length_aging=1.0, natural_lengths=True,
                              compare_policies="fcfs,spf,spf-oracle", request_rates="50", repeat=2,
                              max_tokens=12, max_concurrency=None, seed=0)
    prompts = [f"question {i}: " + "word " * (i % 4) for i in range(6)]
    saved = []
    rows = asyncio.run(serving.compare_policies(args, prompts, {}, saved.append))
    assert saved and saved[-1] is rows and list(rows) == ["50.0"]
    for policy, row in rows["50.0"].items():
        summary = row["median"]
        assert summary["completed"] == len(prompts) and summary["failed"] == 0, policy
        assert len(row["mean_e2e_ms_runs"]) == 2
    assert rows["50.0"]["spf-oracle"]["median"]["prediction_mae"] == 0.0
    assert rows["50.0"]["spf"]["median"]["prediction_mae"] > 0  # the random head is not the truth
    ratios = serving.policy_ratios(rows, "fcfs", "spf")
    assert set(ratios["50.0"]) == {"mean_e2e_speedup", "p99_e2e_ratio", "mean_ttft_speedup", "throughput_ratio"}
