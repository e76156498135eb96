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
    for policy in args.compare_policies.split(","):
        row = rows["50.0"][policy]
        summary = row["median"]
        assert summary["completed"] == len(prompts) and summary["failed"] == 0, policy
        assert len(row["mean_e2e_ms_runs"]) == 2
    assert rows["50.0"]["spf-oracle"]["median"]["prediction_mae"] == 0.0
    assert rows["50.0"]["spf"]["median"]["prediction_mae"] > 0  # the random head is not the truth
    # the slot-model ceiling from the oracle's true lengths: SRPT never loses to FCFS on mean latency
    assert rows["50.0"]["ceiling"]["slots"] == 2 and rows["50.0"]["ceiling"]["mean_speedup"] >= 1.0
    ratios = serving.policy_ratios(rows, "fcfs", "spf")
    assert set(ratios["50.0"]) == {"mean_e2e_speedup", "p99_e2e_ratio", "mean_ttft_speedup", "throughput_ratio"}


class CountingMeter:
    """A fake energy counter: 5 J more at every read."""
    name = "fake"

    def __init__(self):
        self.total = 0.0

    def read_joules(self) -> float:
        self.total += 5.0
        return self.total


def test_energy_is_reported_where_a_meter_exists_and_absent_where_none(monkeypatch):
    import math

    import common
    import serving

    async def backend(prompt: str, max_tokens: int):
        yield 3  # one chunk of 3 tokens

    for meter, joules, per_token in ((CountingMeter(), 5.0, 5.0 / 6), (None, None, None)):
        monkeypatch.setattr(common, "energy_meter", lambda: meter)
        results, duration, measured = asyncio.run(serving.run_load(backend, ["a", "b"], 3, math.inf, None, 0))
        summary = serving.summarize(results, duration, {}, measured)
        assert (summary["energy_joules"], summary["energy_per_token_j"]) == (joules, per_token)
        assert common.machine()["energy_meter"] == (meter.name if meter else None)
