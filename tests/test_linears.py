"""Linear layers over oneDNN's packed weights (helios/linears.py): the same outputs as nn.Linear,
the same greedy tokens through the engine, what `auto` picks, and what packing keeps in memory."""

import pytest
import torch
from torch import nn

from helios import LLM, SamplingParams
from helios import linears
from helios.linears import PackedLinear, onednn_unavailable, pack_linears, resolve_linear_kernel

needs_onednn = pytest.mark.skipif(onednn_unavailable("cpu", torch.float32) is not None,
                                  reason=f"{onednn_unavailable('cpu', torch.float32)}")


@needs_onednn
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_equals_nn_linear(bias):
    torch.manual_seed(0)
    linear = nn.Linear(96, 200, bias=bias)
    packed = PackedLinear(linear, rows_hint=8)
    for rows in (0, 1, 3, 8, 37, 300):
        x = torch.randn(rows, 96)
        assert packed(x).shape == (rows, 200)
        assert torch.allclose(packed(x), linear(x), atol=1e-5, rtol=1e-5), rows
    strided = torch.randn(20, 96)[::2]  # rows picked out of a larger batch (exits, subsets)
    assert torch.allclose(packed(strided), linear(strided), atol=1e-5, rtol=1e-5)
    assert not hasattr(packed, "weight")


@needs_onednn
def test_engine_gives_the_same_tokens_with_packed_linears(tiny_model_dir):
    """Greedy tokens and logprobs of a mixed batch: onednn against nn.Linear (qwen2: biased q/k/v;
    gemma3: a tied LM head)."""
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=0)
    prompts = [[5, 9, 13], [7] * 11, list(range(3, 40))]
    for arch in ("llama", "qwen2", "gemma3"):
        folder, _ = tiny_model_dir(arch)
        runs = {}
        for kernel in ("torch", "onednn"):
            llm = LLM(str(folder), kv_cache_memory=1 << 20, max_num_seqs=4, linear_kernel=kernel)
            assert llm.engine.linear_kernel == kernel
            runs[kernel] = llm.generate(prompts, params, use_tqdm=False)
        for plain, packed in zip(runs["torch"], runs["onednn"]):
            assert packed.token_ids == plain.token_ids, arch
            assert [t["logprob"] for t in packed.logprobs] == pytest.approx(
                [t["logprob"] for t in plain.logprobs], abs=1e-4), arch


@needs_onednn
def test_packing_frees_layer_weights_and_keeps_the_lm_heads(tiny_model_dir):
    """Layers' plain weights go (the packed buffers take their place); the LM head keeps its weight,
    which for a tied head is the embedding's tensor."""
    for arch, tied in (("llama", False), ("gemma3", True)):
        folder, _ = tiny_model_dir(arch)
        model = LLM(str(folder), kv_cache_memory=1 << 20, linear_kernel="torch").engine.model
        plain_layer_bytes = sum(p.numel() * p.element_size() for p in model.layers.parameters())
        head = model.lm_head.weight
        assert pack_linears(model, rows_hint=4) == (4 * len(model.layers) + 1, 0)
        assert isinstance(model.lm_head, PackedLinear) and model.lm_head.weight is head
        assert (model.lm_head.weight.data_ptr() == model.embed_tokens.weight.data_ptr()) == tied
        layer_bytes = sum(t.numel() * t.element_size()
                          for t in [*model.layers.parameters(), *model.layers.buffers()])
        assert layer_bytes == plain_layer_bytes  # packed buffers replace the projections' weights
        assert not any(name.endswith("proj.weight") for name, _ in model.named_parameters())


def test_auto_picks_onednn_where_it_packs(monkeypatch):
    if onednn_unavailable("cpu", torch.float32) is None:  # and gguf, which is onednn and more, in float32
        assert resolve_linear_kernel("auto", "cpu", torch.float32, compiled=False) in ("gguf", "onednn")
    assert resolve_linear_kernel("auto", "cpu", torch.float32, compiled=True) == "torch"
    assert resolve_linear_kernel("auto", "cuda", torch.float32, compiled=False) == "torch"
    assert resolve_linear_kernel("torch", "cpu", torch.float32, compiled=False) == "torch"
    with pytest.raises(ValueError, match="CPU path"):
        resolve_linear_kernel("onednn", "cuda", torch.float32, compiled=False)
    # a CPU that cannot pack the dtype (bfloat16 without AVX-512): auto falls back, onednn says why
    monkeypatch.setattr(linears, "onednn_unavailable", lambda device, dtype: "oneDNN cannot pack bfloat16")
    assert resolve_linear_kernel("auto", "cpu", torch.bfloat16, compiled=False) == "torch"
    with pytest.raises(ValueError, match="cannot pack bfloat16"):
        resolve_linear_kernel("onednn", "cpu", torch.bfloat16, compiled=False)


def test_onednn_and_compiled_layers_exclude_each_other():
    if onednn_unavailable("cpu", torch.float32) is not None:
        pytest.skip("no oneDNN packing here")
    with pytest.raises(ValueError, match="compile_layers"):
        resolve_linear_kernel("onednn", "cpu", torch.float32, compiled=True)
