"""EngineConfig.compile_layers: the layers' dense parts compiled by inductor give the same tokens."""

import pytest

from helios import LLM, SamplingParams
from helios.cli_options import add_engine_arguments, engine_options
from helios.model import DecoderLayer

PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 3], list(range(40, 58))]


def test_compiled_layers_generate_the_same_tokens(tiny_model_dir):
    pytest.importorskip("torch._inductor")
    folder, _ = tiny_model_dir("llama")
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    eager = LLM(str(folder), kv_cache_memory=1 << 20, dtype="float32").generate(PROMPTS, params)
    compiled_llm = LLM(str(folder), kv_cache_memory=1 << 20, dtype="float32", compile_layers=True)
    assert compiled_llm.engine.runner.layer_qkv is not DecoderLayer.qkv  # the compiled one runs
    compiled = compiled_llm.generate(PROMPTS, params)
    assert [o.token_ids for o in compiled] == [o.token_ids for o in eager]


def test_compile_layers_is_a_switch_on_the_command_line():
    import argparse

    parser = argparse.ArgumentParser()
    add_engine_arguments(parser, only={"compile_layers"})
    assert engine_options(parser.parse_args([]), only={"compile_layers"})["compile_layers"] is False
    assert engine_options(parser.parse_args(["--compile-layers"]), only={"compile_layers"})["compile_layers"] is True
    assert engine_options(parser.parse_args(["--no-compile-layers"]), only={"compile_layers"})["compile_layers"] is False
