"""`helios profile` on two tiny random models: a valid repository with every figure per depth."""

import json

import yaml

from controller.repository import load_repository
from helios.cli import main


def test_profile_writes_a_repository_for_each_candidate_and_depth(tmp_path, tiny_chat_model_dir):
    llama, qwen = tiny_chat_model_dir("llama"), tiny_chat_model_dir("qwen2")
    slo = {"model": "assistant", "memory_budget": "64MiB", "candidates": [
        {"id": "llama", "source": str(llama), "depths": [2, 4],
         "engine": {"exit_policy": "token", "exit_layers": [1, 2, 3], "exit_threshold": 0.02}},
        {"id": "qwen", "source": str(qwen), "depths": [4]}]}
    (tmp_path / "slo.yaml").write_text(yaml.safe_dump(slo))
    prompts = [{"prompt": text} for text in ("The capital of France", "Once upon a time", "numbers 0123")]
    (tmp_path / "prompts.jsonl").write_text("\n".join(json.dumps(p) for p in prompts))
    answers = [{"instruction": "What is 2 + 3?", "output": "2 + 3 = 5\n#### 5"}] * 2
    (tmp_path / "answers.json").write_text(json.dumps(answers))
    out = tmp_path / "repo.json"
    assert main(["profile", str(tmp_path / "slo.yaml"), "--out", str(out), "--dataset", str(tmp_path / "prompts.jsonl"),
                 "--prompts", "3", "--max-tokens", "6", "--batch-sizes", "1,4", "--answers",
                 str(tmp_path / "answers.json"), "--answer-prompts", "2", "--answer-max-tokens", "4",
                 "--kv-cache-memory", str(8 << 20)]) == 0

    repo = load_repository(out)  # validates: prefix weights, KV bytes, exit shares summing to 1
    llama_entry, qwen_entry = repo.candidates["llama"], repo.candidates["qwen"]
    assert sorted(llama_entry.depths) == [2, 4] and sorted(qwen_entry.depths) == [4]
    # equal accuracy (none right, random weights) falls to the larger: qwen2 adds q/k/v biases
    assert repo.reference == "qwen"
    # 4 layers, 2 KV heads of 16 dims, K and V, float32
    assert llama_entry.num_layers == 4 and llama_entry.kv_bytes_per_token_per_layer == 2 * 2 * 16 * 4
    assert len(set(llama_entry.weight_bytes_per_layer)) == 1 and llama_entry.weight_bytes_per_layer[0] > 0
    assert llama_entry.weight_bytes(2) < llama_entry.weight_bytes(4)
    full, prefix = llama_entry.depths[4], llama_entry.depths[2]
    assert full.agreement == 1.0 and qwen_entry.depths[4].reference_agreement == 1.0
    assert set(prefix.exit_distribution) <= {1, 2} and set(full.exit_distribution) <= {1, 2, 3, 4}
    assert 0 <= prefix.breach_share <= prefix.exit_distribution.get(2, 0) + 1e-9
    for depth in (full, prefix, qwen_entry.depths[4]):
        assert sorted(depth.throughput) == [1, 4] and all(rate > 0 for rate in depth.throughput.values())
        # TTFT and latency come from separate requests: on a loaded machine either may be the larger
        assert depth.ttft_s > 0 and depth.latency_s > 0 and depth.tpot_s >= 0 and depth.ttft_p95_s >= depth.ttft_s
        assert depth.task_accuracy is not None and 0 <= depth.reference_agreement <= 1
    assert json.loads(out.read_text())["settings"]["batch_sizes"] == [1, 4]
