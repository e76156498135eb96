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


def test_offline_bench_runs_end_to_end(tiny_chat_model_dir, tmp_path):
    """Both modes (real exits against transformers, synthetic exits) write their report: the command
    in bench/results/README.md keeps working as the engine changes under it."""
    import json
    import subprocess

    folder = tiny_chat_model_dir("llama")
    data = tmp_path / "prompts.json"
    data.write_text(json.dumps([{"instruction": f"Count to {i}.", "input": "", "output": ""} for i in range(3)]))
    root = Path(__file__).resolve().parent.parent
    for extra in ([], ["--exit-profile", "2:0.5,4:0.5"]):
        out = tmp_path / "report.json"
        subprocess.run([sys.executable, "bench/offline.py", "--model", str(folder), "--dataset", str(data),
                        "--num-prompts", "3", "--num-prompts-batch1", "1", "--max-tokens", "4", "--batch-size", "3",
                        "--exit-layers", "2", "--kv-cache-memory", str(4 << 20), "--json", str(out), *extra],
                       cwd=root, check=True, timeout=600, capture_output=True)
        assert json.loads(out.read_text())["results"]
