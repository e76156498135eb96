"""GGUF loading: dequantize, undo llama.cpp's q/k permutation, read only the layer prefix."""

import numpy as np
import pytest
import torch

from helios import LLM, SamplingParams
from helios.loader import ModelLoadError, load_model

GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)


def permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert script permutation of q/k rows."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path, hf) -> None:
    import gguf

    cfg = hf.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    sd = {k: v.numpy() for k, v in hf.state_dict().items()}
    writer.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    writer.add_tensor("output_norm.weight", sd["model.norm.weight"])
    writer.add_tensor("output.weight", sd["lm_head.weight"])
    names = {"input_layernorm.weight": "attn_norm.weight", "self_attn.o_proj.weight": "attn_output.weight",
             "post_attention_layernorm.weight": "ffn_norm.weight", "mlp.gate_proj.weight": "ffn_gate.weight",
             "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight",
             "self_attn.v_proj.weight": "attn_v.weight"}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        for hf_name, gguf_name in names.items():
            writer.add_tensor(f"blk.{i}.{gguf_name}", sd[p + hf_name])
        writer.add_tensor(f"blk.{i}.attn_q.weight", permute(sd[p + "self_attn.q_proj.weight"], cfg.num_attention_heads))
        writer.add_tensor(f"blk.{i}.attn_k.weight", permute(sd[p + "self_attn.k_proj.weight"], cfg.num_key_value_heads))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def tiny_gguf(tiny_model_dir, tmp_path_factory):
    _, hf = tiny_model_dir("llama")
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_gguf(path, hf)
    return path, hf


def test_gguf_equals_transformers(tiny_gguf):
    path, hf = tiny_gguf
    prompt = [5, 6, 7, 8, 9, 10]
    out = LLM(str(path), kv_cache_memory=1 << 20).generate([prompt], GREEDY)[0]
    ref = hf.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, eos_token_id=None,
                      pad_token_id=0)[0, len(prompt):].tolist()
    assert out.token_ids == ref


def test_gguf_prefix_reads_only_those_layers(tiny_gguf, monkeypatch):
    from helios import loader

    path, _ = tiny_gguf
    read = []
    original = loader._GGUFFile.get
    monkeypatch.setattr(loader._GGUFFile, "get", lambda self, name: read.append(name) or original(self, name))
    loaded = load_model(str(path), max_layers=2, load_tokenizer=False)
    assert len(loaded.model.layers) == 2
    assert not [n for n in read if n.startswith(("model.layers.2.", "model.layers.3."))]


def test_corrupt_gguf_is_a_clear_error(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(ModelLoadError, match="broken.gguf"):
        load_model(str(bad))
