"""Fuzzing: the HTTP API against its own OpenAPI schema (schemathesis), the serving config and SLO loaders (hypothesis).

The API is fuzzed on the `hardened` app (conftest): its limits keep every accepted request small
(max_tokens <= 50, n <= 2), and `model` is narrowed to the served one so that valid requests reach
the engine instead of stopping at "model not found". Every answer must be a status the schema
documents, a 4xx must carry OpenAI's error body, and no request may get a 5xx. Data the schema
refuses must be refused (this found booleans taken as integers: `"prompt": [[false]]` ran as token
id 0; and `temperature: 2.6e-42` gave NaN probabilities that failed the engine). The reverse is not checked: the server's limits, the context and unsupported values
(`echo: true`, non-zero penalties) refuse some schema-valid requests, with a 400.
"""

import re
import string

import httpx
import pytest
import schemathesis
import yaml
from schemathesis.specs.openapi.checks import positive_data_acceptance
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from controller.slo import load_slo, parse_slo
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
                       json={"model": "tiny", "prompt": "Hello", "max_tokens": 3, "ignore_eos": True})  # a random model may end at once
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
    ({"limits": {"max_body_bytes": "9" * 309 + "GiB"}}, "limits.max_body_bytes"),  # past a float: was OverflowError
    ([], "top level"),  # was read as the empty config
])
def test_config_errors_name_the_key_path(data, path):
    with pytest.raises(ConfigError, match=path.replace(".", r"\.")):
        parse_config(data)


def test_a_config_file_that_is_not_text_is_a_config_error(tmp_path):
    bad = tmp_path / "serve.yaml"
    bad.write_bytes(b"models: \xff\xfe\x00")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(bad)


# ---- the SLO file (controller/slo.py) -----------------------------------------------------------------

_SLO = {"model": "assistant", "objective": "latency", "memory_budget": "1GiB",
        "candidates": [{"id": "tuned", "source": "smollm2-135m", "depths": [18, 30],
                        "engine": {"exit_policy": "token", "exit_layers": [6, 12]}, "num_cpus": 1},
                       {"id": "full", "source": "smollm2-135m", "depths": [30]}],
        "constraints": {"min_quality": 0.5, "p95_ttft_s": 2.0}, "breach_window": {"tokens": 100, "limit": 50},
        "hysteresis": {"min_gain": 1.1}, "admin": {"enabled": True, "route_prefix": "/admin"},
        "http": {"port": 8000}, "ingress": {"replicas": 1}}
_slo_keys = st.sampled_from(["model", "candidates", "id", "source", "depths", "engine", "objective", "constraints",
                             "min_quality", "memory_budget", "breach_window", "tokens", "limit", "hysteresis",
                             "admin", "enabled", "route_prefix", "http", "port", "ingress", "max_layers", "bogus"])
# sizes a size parser may choke on: huge, fractional, signed, unit-only
_sizes = st.one_of(st.from_regex(r"\A[0-9]{1,400}(\.[0-9]{1,3})?\s?(B|KiB|MB|GiB|TiB|kb|XB)?\Z"),
                   st.sampled_from(["9" * 400, "9" * 400 + "GiB", "-1GiB", "GiB", "1e3", "", " ", "0"]))
_slo_values = st.recursive(st.one_of(_scalars, _sizes), lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.one_of(_slo_keys, _scalars), inner, max_size=4)), max_leaves=10)


def _paths(data, prefix: tuple = ()) -> list[tuple]:
    """Every key path in a nested mapping/list (list items by index)."""
    children = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, list) else []
    paths = [prefix] if prefix else []
    for key, value in children:
        paths += _paths(value, prefix + (key,))
    return paths


def _get(data, path: tuple):
    for key in path:
        data = data[key]
    return data


def _set(data, path: tuple, value):
    """A deep copy of `data` with `path` set to `value` (its last key added if missing)."""
    if not path:
        return value
    copy = dict(data) if isinstance(data, dict) else list(data)
    copy[path[0]] = _set(copy[path[0]], path[1:], value) if len(path) > 1 else value
    return copy


def _names(exc: ConfigError, path: str) -> bool:
    """Whether the SLO config error has a line for `path` (or for something under it)."""
    return re.search(rf"^  {re.escape(path)}[.:]", str(exc), re.MULTILINE) is not None


def _is_slo_error(exc: ConfigError) -> bool:
    return str(exc).startswith("invalid SLO config:\n  ")


@settings(max_examples=200, deadline=None, derandomize=True)
@given(st.data())
def test_slo_mutations_fail_with_config_error_at_their_path(data):
    """A valid SLO with one value replaced, or one unknown key added, at any level: a valid SLO or
    a ConfigError whose key paths include the changed one or one of its ancestors."""
    if data.draw(st.booleans()):
        path = data.draw(st.sampled_from(_paths(_SLO)))
    else:  # an unknown key in any mapping
        path = data.draw(st.sampled_from([()] + [p for p in _paths(_SLO) if isinstance(_get(_SLO, p), dict)]))
        path += ("bogus",)
    value = data.draw(_slo_values)
    try:
        parse_slo(_set(_SLO, path, value))
    except ConfigError as exc:
        ancestors = [".".join(str(p) for p in path[:n]) for n in range(len(path), 0, -1)]
        assert _is_slo_error(exc) and any(_names(exc, p) for p in ancestors + ["(top level)"]), (path, str(exc))


@settings(max_examples=100, deadline=None, derandomize=True)
@given(st.one_of(st.dictionaries(st.one_of(_slo_keys, _scalars), _slo_values, max_size=6), _slo_values))
def test_parse_slo_fails_only_with_config_error(data):
    """Any value at all (mappings with SLO keys, lists, scalars): an SLOConfig or a ConfigError."""
    try:
        parse_slo(data)
    except ConfigError as exc:
        assert _is_slo_error(exc), str(exc)


_garbage = st.one_of(st.binary(max_size=60), st.sampled_from([b"\xff\xfe\x00garbage", b"\x80\x81", b"model: \xc3"]))


@settings(max_examples=100, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(st.text(max_size=80).map(str.encode), _garbage,
                 _slo_values.map(lambda v: yaml.safe_dump(v, default_flow_style=True).encode()),
                 st.just(yaml.safe_dump(_SLO).encode())))
def test_load_slo_fails_only_with_config_error(tmp_path, raw):
    """Any file (YAML of any shape, non-mapping YAML, bytes that are not UTF-8): a ConfigError, never
    another exception; an error about the file itself names the file."""
    path = tmp_path / "slo.yaml"
    path.write_bytes(raw)
    try:
        load_slo(path)
    except ConfigError as exc:
        assert str(path) in str(exc) or _is_slo_error(exc), str(exc)


@pytest.mark.parametrize("path, value", [
    (("bogus",), 1), (("constraints", "bogus"), 1), (("candidates", 0, "bogus"), 1),
    (("candidates", 0, "engine", "bogus"), 1), (("breach_window", "bogus"), 1), (("hysteresis", "bogus"), 1),
    (("admin", "bogus"), 1), (("http", "bogus"), 1), (("ingress", "bogus"), 1),
    (("memory_budget",), "9" * 400 + "GiB"), (("memory_budget",), "lots"), (("candidates", 0, "depths", 1), "x"),
    (("model",), ["a"]), (("http", "port"), "eighty"),
    (("constraints", "min_quality"), 2), (("objective",), "speed"), (("admin", "route_prefix"), "no-slash"),
])
def test_slo_errors_name_the_key_path(path, value):
    with pytest.raises(ConfigError) as caught:
        parse_slo(_set(_SLO, path, value))
    assert _names(caught.value, ".".join(str(p) for p in path)), str(caught.value)


def test_slo_controller_owned_engine_keys_are_named():
    with pytest.raises(ConfigError, match=r"candidates\.1: .*engine\.max_layers is set by the controller"):
        parse_slo(_set(_SLO, ("candidates", 1, "engine"), {"max_layers": 12}))
