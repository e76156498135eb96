"""The serving config schema: defaults, sizes, and errors that name the key path."""

import pytest

from deployments.config import ConfigError, load_config, parse_config


def test_defaults_serve_the_default_model_on_localhost():
    config = parse_config(None)
    assert (config.http.host, config.http.port) == ("127.0.0.1", 8000)
    assert [m.id for m in config.models] == ["smollm2-135m"]
    assert config.models[0].engine_config().model == "smollm2-135m"


def test_engine_options_and_sizes(tmp_path):
    path = tmp_path / "serve.yaml"
    path.write_text("models:\n  - id: small\n    source: /models/x\n    engine:\n      max_layers: 12\n"
                    "      kv_cache_memory: 512MiB\n      exit_policy: token\n      exit_layers: [6]\n")
    model = load_config(path).models[0]
    engine = model.engine_config()
    assert (engine.model, engine.max_layers, engine.kv_cache_memory) == ("/models/x", 12, 512 << 20)
    assert (engine.exit_policy, engine.exit_layers) == ("token", [6])


@pytest.mark.parametrize("data, fragment", [
    ({"htp": {}}, "htp: Extra inputs are not permitted"),
    ({"http": {"port": 70000}}, "http.port"),
    ({"models": [{"id": "a", "engine": {"max_layer": 3}}]}, "models.0.engine.max_layer"),
    ({"models": [{"id": "a", "engine": {"exit_policy": "sometimes"}}]}, "exit_policy must be one of"),
    ({"models": [{"id": "a", "engine": {"kv_cache_memory": "lots"}}]}, "is not a size"),
    ({"models": [{"id": "a", "engine": {"model": "x"}}]}, "`source`"),
    ({"models": [{"id": "a"}, {"id": "a"}]}, "repeated: ['a']"),
    ({"models": [{"id": "a", "replicas": 0}]}, "models.0.replicas"),
    ({"models": []}, "models"),
    ({"models": [{"id": "a", "max_ongoing_requests": 32, "engine": {"scheduling_policy": "spf"}}]},
     "max_ongoing_requests (32) is below engine.max_num_seqs (64) + engine.length_lookahead (64)"),
])
def test_bad_configs_name_the_key_and_reason(data, fragment):
    with pytest.raises(ConfigError) as error:
        parse_config(data)
    assert fragment in str(error.value)


def test_spf_models_hold_the_requests_they_rank():
    """spf ranks only what the engine holds: unless set, a model's max_ongoing_requests rises to
    max_num_seqs + length_lookahead (fcfs keeps 64)."""
    def ongoing(**engine) -> int:
        return parse_config({"models": [{"id": "a", "engine": engine}]}).models[0].max_ongoing_requests

    assert ongoing() == ongoing(scheduling_policy="fcfs", max_num_seqs=16) == 64
    assert ongoing(scheduling_policy="spf") == 128
    assert ongoing(scheduling_policy="spf-reserve", max_num_seqs=16, length_lookahead=8) == 64
    assert ongoing(scheduling_policy="spf", max_num_seqs=100, length_lookahead=30) == 130
    explicit = {"id": "a", "max_ongoing_requests": 200, "engine": {"scheduling_policy": "spf"}}
    assert parse_config({"models": [explicit]}).models[0].max_ongoing_requests == 200


def test_unreadable_config_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(bad)


def test_build_app_takes_a_path_or_the_config_itself(tmp_path):
    from deployments.app import build_app

    path = tmp_path / "serve.yaml"
    path.write_text("models:\n  - id: a\n    replicas: 2\n")
    for args in ({"config": str(path)}, {"models": [{"id": "a", "replicas": 2}]}):
        app = build_app(args)
        assert type(app).__name__ == "Application"
    with pytest.raises(ConfigError, match="models.0.replicas"):
        build_app({"models": [{"id": "a", "replicas": -1}]})


def test_the_example_config_in_the_docs_is_valid():
    from pathlib import Path

    config = load_config(Path(__file__).parent.parent / "deployments" / "configs" / "example.yaml")
    assert [m.id for m in config.models] == ["smollm2", "smollm2-half"]
    assert config.models[1].engine_config().max_layers == 15
