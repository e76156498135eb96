"""The SLO file schema: the shipped example parses; bad files fail with the key path."""

from pathlib import Path

import pytest
import yaml

from controller.slo import load_slo, parse_slo
from deployments.config import ConfigError

EXAMPLE = Path(__file__).resolve().parent.parent / "controller" / "configs" / "example-slo.yaml"


def minimal(**overrides) -> dict:
    data = {"model": "assistant", "memory_budget": "512MiB",
            "candidates": [{"id": "a", "source": "smollm2-135m", "depths": [30, 18]}]}
    data.update(overrides)
    return data


def test_example_parses_with_its_documented_values():
    slo = load_slo(EXAMPLE)
    assert slo.model == "assistant" and slo.objective == "throughput"
    assert [c.id for c in slo.candidates] == ["smollm2-tuned", "smollm2-full"]
    tuned = slo.candidate("smollm2-tuned")
    assert tuned.depths == [18, 24, 30] and tuned.engine.exit_policy == "token"
    assert tuned.engine.exit_heads == "smollm2-135m" and tuned.engine.exit_target == 0.95
    assert slo.memory_budget == 1 << 30
    assert (slo.breach_window.tokens, slo.breach_window.limit) == (100, 50)
    assert slo.admin.enabled is False
    assert slo.history == str(EXAMPLE.parent / "helios-history.jsonl")  # beside the SLO file


def test_absolute_files_stay_as_written(tmp_path):
    (tmp_path / "slo.yaml").write_text(yaml.safe_dump(minimal(history="/var/h.jsonl", repository="r.json")))
    slo = load_slo(tmp_path / "slo.yaml")
    assert (slo.history, slo.repository) == ("/var/h.jsonl", str(tmp_path / "r.json"))


def test_defaults_follow_the_paper():
    slo = parse_slo(minimal())
    assert slo.shortlist_size == 3 and slo.profiling_prompts == 5 and slo.reassess_every == 150
    assert (slo.breach_window.tokens, slo.breach_window.limit) == (100, 50)
    assert slo.candidates[0].depths == [18, 30]  # sorted
    assert slo.memory_budget == 512 << 20


@pytest.mark.parametrize("data, path", [
    (minimal(objective="speed"), "objective"),
    (minimal(colour="red"), "colour"),
    (minimal(constraints={"min_quality": 1.5}), "constraints.min_quality"),
    (minimal(breach_window={"tokens": 100, "limt": 5}), "breach_window.limt"),
    (minimal(candidates=[{"id": "a", "depths": [0]}]), "candidates.0.depths"),
    (minimal(candidates=[{"id": "a", "depths": [3, 3]}]), "candidates.0.depths"),
    (minimal(candidates=[{"id": "a", "depths": [3], "engine": {"max_layers": 3}}]), "candidates.0"),
    (minimal(candidates=[{"id": "a", "depths": [3], "engine": {"exit_policy": "all"}}]), "candidates.0.engine"),
    (minimal(candidates=[{"id": "a", "depths": [3]}, {"id": "a", "depths": [4]}]), "candidates"),
    (minimal(memory_budget="lots"), "memory_budget"),
    (minimal(hysteresis={"min_gain": 0.5}), "hysteresis.min_gain"),
])
def test_bad_values_name_their_key_path(data, path):
    with pytest.raises(ConfigError) as error:
        parse_slo(data)
    assert f"  {path}" in str(error.value)


def test_missing_required_keys_are_named():
    with pytest.raises(ConfigError) as error:
        parse_slo({"model": "x"})
    assert "candidates" in str(error.value) and "memory_budget" in str(error.value)
