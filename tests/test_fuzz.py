"""Fuzzing: the HTTP API against its own OpenAPI schema (schemathesis), the serving config loaders (hypothesis).

The API is fuzzed on the `hardened` app (conftest): its limits keep every accepted request small
(max_tokens <= 50, n <= 2), and `model` is narrowed to the served one so that valid requests reach
the engine instead of stopping at "model not found". Every answer must be a status the schema
documents, a 4xx must carry OpenAI's error body, and no request may get a 5xx. Data the schema
refuses must be refused (this found booleans taken as integers: `"prompt": [[false]]` ran as token
id 0; and `temperature: 2.6e-42` gave NaN probabilities that failed the engine). The reverse is not checked: the server's limits, the context and unsupported values
(`echo: true`, non-zero penalties) refuse some schema-valid requests, with a 400.
"""

import string

import httpx
import pytest
import schemathesis
import yaml
from schemathesis.specs.openapi.checks import positive_data_acceptance
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deployments.config import ConfigError, load_config, parse_config
from deployments.ingress import app

EXAMPLES_PER_ROUTE = 25


def _schema_for(model: str) -> dict:
    raw = app.openapi()
    raw = {**raw, "components": {**raw["components"], "schemas": dict(raw["components"]["schemas"])}}
    for name in ("CompletionRequest", "ChatCompletionRequest"):
        request = dict(raw["components"]["schemas"][name])
        request["properties"] = {**request["properties"], "model": {"type": "string", "enum": [model]}}
        raw["components"]["schemas"][name] = request
    return raw


schema = schemathesis.openapi.from_dict(_schema_for("tiny"))


@schema.parametrize()
@settings(max_examples=EXAMPLES_PER_ROUTE, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
def test_api_answers_every_request_with_a_documented_status(case, hardened):
    response = case.call(base_url=hardened["base_url"], headers={"authorization": f"Bearer {hardened['api_key']}"},
                         timeout=60)
    assert response.status_code < 500, (case.body, response.text)
    # status documented, content type and body as the schema says, schema-invalid data refused
    case.validate_response(response, excluded_checks=[positive_data_acceptance])
    if response.status_code >= 400:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"], response.text


def test_server_is_healthy_after_fuzzing(hardened, served):
    for base in (hardened["base_url"], served["base_url"]):
        assert httpx.get(base + "/health", timeout=30).json()["status"] == "ok"
    reply = httpx.post(hardened["base_url"] + "/v1/completions", timeout=60,
                       headers={"authorization": f"Bearer {hardened['api_key']}"},
                       json={"model": "tiny", "prompt": "Hello", "max_tokens": 3})
    assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 3


# ---- the serving config -----------------------------------------------------------------------------

_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                     st.text(string.printable, max_size=12))
_keys = st.sampled_from(["http", "host", "port", "models", "id", "source", "engine", "replicas", "num_cpus",
                         "max_layers", "kv_cache_memory", "limits", "max_body_bytes", "auth", "api_keys_file",
                         "ingress", "docs", "model_roots", "metrics_export_port", "stream_interval", "bogus"])
_values = st.recursive(_scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                         st.dictionaries(_keys, inner, max_size=4)), max_leaves=12)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(_keys, _values, max_size=5))
def test_parse_config_fails_only_with_config_error(data):
    """Any mapping: a ServeConfig or a ConfigError naming key paths, never another exception."""
    try:
        parse_config(data)
    except ConfigError as exc:
        assert str(exc).startswith("invalid serving config:\n  ") and ": " in str(exc)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(st.text(max_size=80), _values.map(lambda v: yaml.safe_dump(v, default_flow_style=True))))
def test_load_config_fails_only_with_config_error(tmp_path, text):
    path = tmp_path / "serve.yaml"
    path.write_text(text)
    try:
        load_config(path)
    except ConfigError as exc:
        assert str(path) in str(exc) or "invalid serving config" in str(exc)


@pytest.mark.parametrize("data, path", [
    ({"models": [{"engine": {"kv_cache_memory": "lots"}}]}, "models.0"),
    ({"limits": {"max_body_bytes": "1 parsec"}}, "limits.max_body_bytes"),
    ({"limits": {"max_n": 17}}, "limits.max_n"),
    ({"auth": {"api_keys": ["sk-in-clear"]}}, "auth.api_keys"),
    ({"ingress": {"shutdown_grace_s": -1}}, "ingress.shutdown_grace_s"),
])
def test_config_errors_name_the_key_path(data, path):
    with pytest.raises(ConfigError, match=path.replace(".", r"\.")):
        parse_config(data)
