"""The model repository file: round trip, stable order, validation with key paths."""

import json

import pytest

from controller.repository import CandidateProfile, DepthProfile, Repository, load_repository, save_repository
from deployments.config import ConfigError

MiB = 1 << 20


def depth_profile(candidate: dict, depth: int, *, throughput: dict | None = None, latency_s: float = 1.0,
                  exits: dict | None = None, agreement: float = 1.0, reference_agreement: float | None = None,
                  ttft_s: float = 0.05, tpot_s: float = 0.02, breach_share: float = 0.0, **extra) -> dict:
    """A DepthProfile mapping consistent with `candidate`'s per-layer figures."""
    return {"weight_bytes": candidate["weight_bytes_shared"] + sum(candidate["weight_bytes_per_layer"][:depth]),
            "kv_bytes_per_token": candidate["kv_bytes_per_token_per_layer"] * depth,
            "throughput": throughput or {1: 10.0, 8: 50.0}, "ttft_s": ttft_s, "ttft_p95_s": ttft_s * 1.5,
            "tpot_s": tpot_s, "tpot_p95_s": tpot_s * 1.5, "latency_s": latency_s,
            "exit_distribution": exits or {depth: 1.0}, "breach_share": breach_share, "agreement": agreement,
            "reference_agreement": reference_agreement, **extra}


def candidate(num_layers: int = 8, layer_bytes: int = 10 * MiB, shared: int = 20 * MiB, kv_per_layer: int = 1024,
              depths: dict[int, dict] | None = None, source: str = "tiny") -> dict:
    """A CandidateProfile mapping; `depths` maps depth -> depth_profile keyword overrides."""
    data = {"source": source, "num_layers": num_layers, "weight_bytes_shared": shared,
            "weight_bytes_per_layer": [layer_bytes] * num_layers, "kv_bytes_per_token_per_layer": kv_per_layer}
    data["depths"] = {d: depth_profile(data, d, **options) for d, options in (depths or {num_layers: {}}).items()}
    return data


def repository(**candidates: dict) -> Repository:
    return Repository.model_validate({"candidates": candidates})


def test_round_trip_and_stable_numeric_order(tmp_path):
    repo = repository(b=candidate(depths={8: {}, 4: {"exits": {2: 0.5, 4: 0.5}}}),
                      a=candidate(depths={8: {"throughput": {32: 90.0, 4: 30.0, 16: 60.0}}}))
    path = tmp_path / "repo.json"
    save_repository(repo, path)
    assert load_repository(path) == repo
    text = path.read_text()
    assert text == repo.to_json()  # deterministic: saving again gives the same bytes
    assert text.index('"a"') < text.index('"b"')
    # depths and batch sizes in numeric order, not string order ("16" < "4" as strings)
    b_section = text[text.index('"b"'):]
    assert b_section.index('"4": {') < b_section.index('"8": {')
    assert text.index('"4": 30.0') < text.index('"16": 60.0') < text.index('"32": 90.0')
    loaded = json.loads(text)
    assert loaded["format"] == "helios-model-repository/1"


def test_prefix_weights_are_shared_plus_layers():
    profile = CandidateProfile.model_validate(candidate(depths={3: {}, 8: {}}))
    assert profile.weight_bytes(3) == 20 * MiB + 3 * 10 * MiB
    assert profile.depths[3].kv_bytes_per_token == 3 * 1024
    assert profile.full_exit_distribution() == {8: 1.0}


@pytest.mark.parametrize("mutate, path", [
    (lambda d: d["candidates"]["a"]["depths"][8].update(weight_bytes=1), "candidates.a"),
    (lambda d: d["candidates"]["a"]["depths"][8].update(exit_distribution={8: 0.5}), "candidates.a.depths.8"),
    (lambda d: d["candidates"]["a"]["depths"][8].update(agreement=1.2), "candidates.a.depths.8.agreement"),
    (lambda d: d["candidates"]["a"]["depths"][8].update(colour=1), "candidates.a.depths.8.colour"),
    (lambda d: d["candidates"]["a"].update(weight_bytes_per_layer=[1]), "candidates.a"),
    (lambda d: d.update(reference="zzz"), "(top level)"),
    (lambda d: d.update(format="other/2"), "format"),
])
def test_invalid_files_fail_with_the_key_path(tmp_path, mutate, path):
    data = {"candidates": {"a": candidate()}}
    mutate(data)
    file = tmp_path / "repo.json"
    file.write_text(json.dumps(data))
    with pytest.raises(ConfigError) as error:
        load_repository(file)
    assert f"  {path}" in str(error.value)


def test_depth_profile_rejects_exits_beyond_the_depth():
    data = candidate(depths={4: {"exits": {6: 1.0}}})
    with pytest.raises(ValueError, match="outside 1..4"):
        CandidateProfile.model_validate(data)
    assert DepthProfile.model_validate(data["depths"][4])  # alone it is a valid depth record
