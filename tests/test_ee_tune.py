"""Exit-head tuning: KL goes down, calibration meets its target, the command writes usable heads."""

import json

import pytest
import torch

from helios import LLM, SamplingParams
from helios.catalog import CATALOG
from helios.model_cache import missing_packages
from helios.tuning.distill import build_distill_set, full_depth_tokens, same_prefix_agreement
from helios.tuning.ee_tune import TuneOptions, calibrate, exit_scores, kl_to_teacher, simulate, train_head, tune
from helios.exits import SHIPPED_HEADS, ExitHead, ExitHeadError, apply_calibration

TRAIN = ["The capital of France is", "Once upon a time", "Helios serves models", "numbers 0123", "the quick brown fox",
         "a tiny model answered", "questions about the weather", "jumps over the lazy dog"]
HELDOUT = ["Paris is the capital", "early-exit language models", "over the lazy fox", "a time upon once"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tiny_models import build_tiny_chat_model

    folder = tmp_path_factory.mktemp("tiny-tune")
    build_tiny_chat_model(folder, num_hidden_layers=6)
    llm = LLM(str(folder), kv_cache_memory=16 << 20)
    train = build_distill_set(llm, TRAIN * 4, [2, 4], max_tokens=24, progress=False)
    heldout = build_distill_set(llm, HELDOUT * 2, [2, 4], max_tokens=24, progress=False)
    return folder, llm, train, heldout


def test_cached_states_match_the_engine(tiny):
    _, llm, train, _ = tiny
    out = llm.generate(TRAIN[0], SamplingParams(max_tokens=24, temperature=0))[0]
    full = full_depth_tokens(llm.engine.model, out.prompt_token_ids, out.token_ids)
    assert full.tolist() == out.token_ids  # the teacher rows reproduce the greedy output


def test_tuning_lowers_heldout_kl(tiny):
    _, llm, train, heldout = tiny
    model = llm.engine.model
    for layer in (2, 4):
        before = kl_to_teacher(model, ExitHead(layer, 1.0), heldout)
        head = train_head(model, layer, train, TuneOptions(rank=16, epochs=3, batch_size=64))
        assert kl_to_teacher(model, head, heldout) < before


def test_calibration_meets_its_target():
    generator = torch.Generator().manual_seed(0)
    scores = torch.rand(3, 4000, generator=generator)
    agrees = torch.rand(3, 4000, generator=generator) < scores  # higher score, likelier agreement
    for target in (0.8, 0.9, 0.95):
        thresholds = calibrate(scores, agrees, target)
        result = simulate(scores, agrees, thresholds, [2, 4, 6], 8)
        assert result["agreement"] >= target  # on the calibration rows: by construction
        assert result["mean_exit_layer"] < 8  # and some tokens do exit
    held_scores = torch.rand(3, 4000, generator=generator)
    held_agrees = torch.rand(3, 4000, generator=generator) < held_scores
    result = simulate(held_scores, held_agrees, calibrate(scores, agrees, 0.9), [2, 4, 6], 8)
    assert result["agreement"] >= 0.9 - 0.02  # fresh rows from the same distribution: within 0.02


def test_calibrated_heads_on_real_heldout_rows(tiny):
    _, llm, train, heldout = tiny
    model = llm.engine.model
    heads = tune(model, [2, 4], train, TuneOptions(rank=16, epochs=2, batch_size=64))
    scores, agrees = exit_scores(model, heads, heldout)
    thresholds = calibrate(scores, agrees, 0.9)
    assert simulate(scores, agrees, thresholds, [2, 4], 6)["agreement"] >= 0.9


def test_ee_tune_command_writes_heads_the_engine_loads(tiny, tmp_path):
    from helios.cli import main

    folder, _, _, _ = tiny
    train_file, heldout_file = tmp_path / "train.jsonl", tmp_path / "heldout.jsonl"
    train_file.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in TRAIN))
    heldout_file.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in HELDOUT * 2))
    out = tmp_path / "heads"
    assert main(["ee-tune", "--model", str(folder), "--exits", "2,4", "--dataset", str(train_file), "--heldout",
                 str(heldout_file), "--out", str(out), "--max-tokens", "16", "--epochs", "1",
                 "--targets", "0.9,0.97"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert set(report["targets"]) == {"0.9", "0.97"} and report["train_tokens"] > 0
    llm = LLM(str(folder), exit_heads=str(out), exit_policy="token", exit_target=0.95, kv_cache_memory=16 << 20)
    assert llm.engine.runner.confidence == "classifier"
    heads = sorted(llm.engine.runner.heads.values(), key=lambda h: h.layer)[:2]
    assert [h.threshold for h in heads] == report["targets"]["0.97"]["thresholds"]  # lowest target >= 0.95
    assert llm.generate("Hello", SamplingParams(max_tokens=8, temperature=0))[0].token_ids


def test_apply_calibration_refuses_an_unmet_target():
    heads = [ExitHead(2, 1.0)]
    assert apply_calibration(heads, {"calibration": {"0.9": [0.5]}}, 0.85) == 0.9 and heads[0].threshold == 0.5
    with pytest.raises(ExitHeadError, match="none reaches 0.99"):
        apply_calibration(heads, {"calibration": {"0.9": [0.5]}}, 0.99)


@pytest.mark.e2e
@pytest.mark.parametrize("alias", [alias for alias, entry in CATALOG.items() if entry.exit_heads])
def test_shipped_heads_keep_their_calibrated_agreement(alias):
    """The engine at the 0.95 target, on held-out prompts: its tokens agree with full depth
    (on the same prefix) at least as often as calibration promised, within 0.03. In float32,
    the dtype the heads were calibrated in: in bfloat16, full depth alone disagrees with a
    dense full-depth pass on ~2% of tokens (rounding), which no threshold can promise away."""
    entry = CATALOG[alias]
    shipped = SHIPPED_HEADS / entry.exit_heads
    if not (shipped / "exit_heads.json").is_file():
        pytest.skip("no shipped exit heads")
    missing = missing_packages(entry)
    if missing:
        pytest.skip(f"{alias} is not installed: {entry.install_line(missing)}")
    from helios.tuning.datasets import SHARED_DATA, as_requests, load_prompts

    report = json.loads((shipped / "report.json").read_text())
    calibrated = report["targets"]["0.95"]["agreement"]
    path = SHARED_DATA / "self_instruct_seed_tasks.jsonl"
    prompts = load_prompts(path, 200)[-6:] if path.is_file() else ["Write a haiku about autumn."] * 3
    early = LLM(alias, exit_heads=entry.exit_heads, exit_policy="token", exit_target=0.95,
                kv_cache_memory=256 << 20, dtype="float32")
    # chat models get the chat their heads were tuned on; base models (Gemma) the plain text
    outputs = early.generate(as_requests(prompts, early.tokenizer), SamplingParams(max_tokens=48, temperature=0))
    assert same_prefix_agreement(early.engine.model, outputs) >= calibrated - 0.03


def test_oracle_exits_at_the_first_agreeing_head():
    from helios.tuning.ee_tune import oracle

    agrees = torch.tensor([[True, False, False, True], [True, True, False, False]])
    result = oracle(agrees, [2, 4], 6)
    assert result["mean_exit_layer"] == (2 + 4 + 6 + 2) / 4
    assert result["coverage"] == {2: 0.5, 4: 0.25, 6: 0.25}
