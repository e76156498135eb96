"""docs/operate.md: its generated blocks (config and metric reference) match the code."""

from pathlib import Path

import pytest

from deployments import operate_docs

PAGE = Path(__file__).parents[1] / "docs" / "operate.md"


def test_operate_page_is_current():
    page = PAGE.read_text()
    assert operate_docs.fill(page) == page, "stale: run python -m deployments.operate_docs --write docs/operate.md"


def test_reference_lists_every_config_key_and_metric():
    from deployments.config import ModelConfig, ServeConfig
    from helios.config import EngineConfig
    from telemetry.metrics import METRICS

    reference = operate_docs.config_reference()
    for model in (ServeConfig, ModelConfig):
        for name in model.model_fields:
            assert f"| `{name}` |" in reference, name
    for name in EngineConfig.__dataclass_fields__:
        assert name == "model" or f"| `{name}` |" in reference, name
    metrics = operate_docs.metrics_reference()
    assert all(f"`{metric.series}`" in metrics for metric in METRICS)


def test_fill_refuses_a_page_without_its_blocks():
    with pytest.raises(ValueError, match="config-reference"):
        operate_docs.fill("no blocks here")
