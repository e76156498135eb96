"""Linear layers over GGUF blocks (`linear_kernel: gguf`, helios/csrc/gguf_linear.cpp): weights that are
exactly Q4_1 or Q8_0 blocks (as the loader dequantizes a GGUF file) are found and others are not, the
kernel gives the float32 matmul's result for any number of rows, and the engine's greedy tokens and
logprobs do not change."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import quantize
from safetensors.torch import load_file, save_file
from torch import nn

from helios import LLM, SamplingParams
from helios import linears
from helios.gguf_dequant import dequantize
from helios.linears import GGUF_BLOCK_ROWS, PackedLinear, gguf_blocks, onednn_unavailable, resolve_linear_kernel

pytestmark = pytest.mark.skipif(onednn_unavailable("cpu", torch.float32) is not None or linears.gguf_pack_op() is None,
                                reason="needs oneDNN packing and Helios's CPU kernels")


def as_gguf(weight: torch.Tensor, kind: str) -> torch.Tensor:
    """`weight` quantized to GGUF `kind` blocks and dequantized by Helios's loader."""
    qtype = GGMLQuantizationType[kind]
    return dequantize(quantize(weight.numpy(), qtype), qtype)


@pytest.mark.parametrize("kind", ["Q4_1", "Q8_0"])
@pytest.mark.parametrize("bias", [False, True])
def test_blocks_give_the_float32_matmul(kind, bias):
    torch.manual_seed(0)
    linear = nn.Linear(96, 200, bias=bias)
    with torch.no_grad():
        linear.weight.copy_(as_gguf(linear.weight.detach(), kind))
    packed = PackedLinear(linear, rows_hint=8, block_rows=64)
    assert packed.block_rows == 64 and (packed.minimums.numel() > 0) == (kind == "Q4_1")
    assert packed.codes.numel() * packed.codes.element_size() == 200 * 96 // (2 if kind == "Q4_1" else 1)
    for rows in (0, 1, 2, 3, 5, 8, 9, 17, 64):  # every group size of the kernel, and several groups
        x = torch.randn(rows, 96)
        assert torch.allclose(packed(x), linear(x), atol=1e-5, rtol=1e-5), rows
    strided = torch.randn(20, 96)[::2]
    assert torch.allclose(packed(strided), linear(strided), atol=1e-5, rtol=1e-5)


def test_the_decoded_blocks_are_the_loaders_values_exactly():
    """One row x the identity: each output is one weight, decoded by the kernel."""
    weight = as_gguf(torch.randn(40, 64), "Q4_1")
    codes, scales, minimums = gguf_blocks(weight)
    for column in (0, 17, 63):
        x = torch.zeros(1, 64)
        x[0, column] = 1.0
        out = torch.ops.helios.gguf_linear(x, codes, scales, minimums, None)
        assert torch.equal(out[0], weight[:, column])


def test_weights_that_are_not_blocks_stay_on_onednn():
    torch.manual_seed(1)
    assert gguf_blocks(torch.randn(16, 64)) is None  # plain float32
    assert gguf_blocks(as_gguf(torch.randn(16, 64), "Q4_1")[:, :48].contiguous()) is None  # 48 columns
    nearly = as_gguf(torch.randn(16, 64), "Q4_1")
    nearly[3, 5] += 1e-3  # one value off its block's grid
    assert gguf_blocks(nearly) is None
    assert gguf_blocks(torch.zeros(4, 32)) is not None  # a block of zeros is one (scale 0)
    linear = nn.Linear(64, 16)
    assert PackedLinear(linear, rows_hint=8, block_rows=GGUF_BLOCK_ROWS).block_rows == 0


def test_engine_gives_the_same_tokens_on_blocks(tiny_model_dir, tmp_path):
    """A tiny llama whose projections are Q4_1 and LM head Q8_0 (as in SmolLM2's file): gguf against
    nn.Linear, one row and mixed batches, greedy tokens and logprobs."""
    source, _ = tiny_model_dir("llama")
    folder = tmp_path / "quantized"
    folder.mkdir()
    for item in source.iterdir():
        if item.suffix != ".safetensors":
            (folder / item.name).write_bytes(item.read_bytes())
    weights = load_file(source / "model.safetensors")
    for name, tensor in weights.items():
        if name.endswith("proj.weight"):
            weights[name] = as_gguf(tensor, "Q4_1")
        elif name == "lm_head.weight":
            weights[name] = as_gguf(tensor, "Q8_0")
    save_file(weights, folder / "model.safetensors")
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=0)
    batches = [[[5, 9, 13]], [[5, 9, 13], [7] * 11, list(range(3, 40))]]
    runs = {}
    for kernel in ("torch", "gguf"):
        llm = LLM(str(folder), kv_cache_memory=1 << 20, max_num_seqs=4, linear_kernel=kernel)
        assert llm.engine.linear_kernel == kernel
        if kernel == "gguf":  # every projection and the LM head found their blocks
            model = llm.engine.model
            assert model.lm_head.block_rows == GGUF_BLOCK_ROWS and model.lm_head.minimums.numel() == 0
            assert all(layer.down_proj.block_rows == GGUF_BLOCK_ROWS for layer in model.layers)
        runs[kernel] = [out for prompts in batches for out in llm.generate(prompts, params, use_tqdm=False)]
    for plain, blocked in zip(runs["torch"], runs["gguf"]):
        assert blocked.token_ids == plain.token_ids
        assert [t["logprob"] for t in blocked.logprobs] == pytest.approx(
            [t["logprob"] for t in plain.logprobs], abs=1e-4)


def test_auto_picks_gguf_in_float32_only(monkeypatch):
    assert resolve_linear_kernel("auto", "cpu", torch.float32, compiled=False) == "gguf"
    assert resolve_linear_kernel("gguf", "cpu", torch.float32, compiled=False) == "gguf"
    with pytest.raises(ValueError, match="compile_layers"):
        resolve_linear_kernel("gguf", "cpu", torch.float32, compiled=True)
    monkeypatch.setattr(linears, "onednn_unavailable", lambda device, dtype: None)  # a CPU that packs bf16
    assert resolve_linear_kernel("auto", "cpu", torch.bfloat16, compiled=False) == "onednn"
    with pytest.raises(ValueError, match="float32"):
        resolve_linear_kernel("gguf", "cpu", torch.bfloat16, compiled=False)
    monkeypatch.setattr(linears, "gguf_pack_op", lambda: None)  # no compiler
    assert resolve_linear_kernel("auto", "cpu", torch.float32, compiled=False) == "onednn"
    with pytest.raises(RuntimeError, match="could not be built"):
        resolve_linear_kernel("gguf", "cpu", torch.float32, compiled=False)


def test_a_gguf_file_runs_on_blocks(default_llm):
    """The default model's own file: every layer projection (Q4_1) and the LM head (Q8_0) on blocks."""
    engine = default_llm.engine
    if engine.linear_kernel != "gguf":
        pytest.skip(f"the default model runs {engine.linear_kernel} here")
    packed = [module for module in engine.model.modules() if isinstance(module, PackedLinear)]
    assert packed and all(module.block_rows == GGUF_BLOCK_ROWS for module in packed)
    assert np.isclose(sum(m.codes.numel() for m in packed if m.minimums.numel()) * 2,
                      sum(m.in_features * m.out_features for m in packed if m.minimums.numel()))
