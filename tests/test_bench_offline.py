"""bench/offline.py's decode timer counts the tokens of decode-only steps and nothing else."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from helios import LLM, SamplingParams  # noqa: E402


def test_decode_timer_counts_decode_tokens_only(tiny_model_dir):
    from offline import time_decode_steps

    folder, _ = tiny_model_dir("llama")
    llm = LLM(str(folder), kv_cache_memory=4 << 20, max_num_seqs=4)
    totals = time_decode_steps(llm)
    prompts = [[1, 2, 3, 4], [5, 6, 7], [8, 9]]
    outputs = llm.generate(prompts, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    # each request's first token comes from its prefill step; the other five from decode-only steps
    assert [len(o.token_ids) for o in outputs] == [6, 6, 6]
    assert totals["tokens"] == 3 * 5 and totals["seconds"] > 0
