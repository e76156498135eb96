"""The one loader: resolve a model reference, read only the needed tensors, build the model.

A reference is an alias (``smollm2-135m``), a local Hugging Face folder (config.json,
tokenizer, safetensors sharded or not) or a GGUF file. ``max_layers=L`` reads layers
0..L-1 plus the embeddings, final norm and LM head, and nothing else.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from helios.catalog import CATALOG, DEFAULT_MODEL, lookup
from helios.gguf_dequant import dequantize
from helios.gguf_header import GGUFHeader, read_header
from helios.model import DecoderModel, ModelArch, rope_inv_freq
from helios.model_cache import ModelLoadError, model_file

__all__ = ["DEFAULT_MODEL", "LoadedModel", "ModelLoadError", "hf_weights", "load_model", "resolve_model_path"]

# GGUF tensor names -> Hugging Face names (llama.cpp's naming for llama-family models)
_GGUF_GLOBAL = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_GGUF_LAYER = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
# Gemma 3 (llama.cpp's gemma3): its ffn_norm is the pre-MLP norm, plus output and q/k norms
_GGUF_LAYER_GEMMA3 = {
    **_GGUF_LAYER,
    "ffn_norm.weight": "pre_feedforward_layernorm.weight",
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
}


@dataclass
class LoadedModel:
    model: DecoderModel
    arch: ModelArch
    hf_config: Any
    tokenizer: Any  # a transformers tokenizer, or None when the source has none
    source: str  # the resolved file or folder


def resolve_model_path(reference: str) -> Path:
    """An alias (see helios/catalog.py) or a path -> the file or folder that holds the model."""
    entry = lookup(reference)
    if entry is not None:
        return model_file(entry)
    path = Path(os.path.expanduser(reference))
    if not path.exists():
        raise ModelLoadError(
            f"unknown model {reference!r}: not an alias ({', '.join(CATALOG)}) and no such file or folder"
        )
    return path


def _unpermute(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation (interleaved -> half-split rotary layout)."""
    rows = weight.shape[0]
    return weight.reshape(num_heads, rows // num_heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


class _SafetensorsFolder:
    """Tensors of a Hugging Face folder, opened lazily by name."""

    def __init__(self, folder: Path):
        from safetensors import safe_open

        index = folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        else:
            files = sorted(folder.glob("*.safetensors"))
            if not files:
                raise ModelLoadError(f"{folder} has no *.safetensors weights")
            weight_map = {}
            for file in files:
                with safe_open(file, framework="pt") as handle:
                    weight_map.update({name: file.name for name in handle.keys()})
        self.folder, self.weight_map, self._open = folder, weight_map, safe_open

    def get(self, name: str) -> torch.Tensor | None:
        if name not in self.weight_map:
            return None
        with self._open(self.folder / self.weight_map[name], framework="pt") as handle:
            return handle.get_tensor(name)


class _GGUFFile:
    """Tensors of a GGUF file, dequantized one at a time and renamed to Hugging Face names."""

    def __init__(self, path: Path, header: GGUFHeader, arch: ModelArch):
        layer_names = _GGUF_LAYER_GEMMA3 if header.architecture == "gemma3" else _GGUF_LAYER
        self.file = np.memmap(path, dtype=np.uint8, mode="r")  # tensors are read where they lie
        self.tensors = {}
        for name, tensor in header.tensors.items():
            hf_name = _GGUF_GLOBAL.get(name)
            if hf_name is None and name.startswith("blk."):
                _, layer, rest = name.split(".", 2)
                hf_name = f"model.layers.{layer}.{layer_names.get(rest, rest)}"
            self.tensors[hf_name or name] = tensor
        self.permuted = header.architecture == "llama"
        # llama.cpp stores Gemma's norms as 1 + weight (what they multiply by); transformers keeps weight
        self.norm_shift = 1.0 if header.architecture == "gemma3" else 0.0
        self.arch = arch

    def get(self, name: str) -> torch.Tensor | None:
        tensor = self.tensors.get(name)
        if tensor is None:
            return None
        data = dequantize(tensor.array(self.file), tensor.quant_type)
        if self.permuted and name.endswith("q_proj.weight"):
            data = _unpermute(data, self.arch.num_heads)
        elif self.permuted and name.endswith("k_proj.weight"):
            data = _unpermute(data, self.arch.num_kv_heads)
        elif self.norm_shift and name.endswith("norm.weight"):
            data = data - self.norm_shift
        return data


def _open_weights(path: Path, arch: ModelArch, header: GGUFHeader | None) -> Callable[[str], torch.Tensor | None]:
    """Hugging Face tensor name -> its float tensor (None when absent), read on demand."""
    return _GGUFFile(path, header, arch).get if header is not None else _SafetensorsFolder(path).get


def _read_config_and_tokenizer(path: Path, load_tokenizer: bool) -> tuple[Any, Any, GGUFHeader | None]:
    """(config, tokenizer or None, the GGUF header for a GGUF file else None)."""
    from transformers import AutoConfig, AutoTokenizer

    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelLoadError(f"{path}: unsupported file type; give a .gguf file or a Hugging Face folder")
        header = read_header(path, load_tokenizer)
        return header.config, header.tokenizer if load_tokenizer else None, header
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path} is not a Hugging Face model folder: config.json is missing")
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as exc:  # transformers raises many types for a bad file
        raise ModelLoadError(f"cannot read the model config of {path}: {exc}") from exc
    tokenizer = None
    if load_tokenizer:
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except Exception:  # a weights-only folder is still usable with token ids
            tokenizer = None
    return config, tokenizer, None


def hf_weights(reference: str) -> tuple[object, Callable[[str], torch.Tensor | None]]:
    """A model's Hugging Face config and its tensors by Hugging Face name, as load_model reads
    them (GGUF dequantized, q/k rows unpermuted): lets another stack run the same weights."""
    path = resolve_model_path(reference)
    config, _, header = _read_config_and_tokenizer(path, load_tokenizer=False)
    return config, _open_weights(path, ModelArch.from_hf_config(config), header)


def _state_dict(get: Callable[[str], torch.Tensor | None], arch: ModelArch, num_layers: int) -> dict:
    """Our parameter names -> tensors, reading only the loaded layers' tensors."""

    def need(name: str) -> torch.Tensor:
        tensor = get(name)
        if tensor is None:
            raise ModelLoadError(f"the weights have no tensor {name!r}")
        return tensor

    def norm(name: str) -> torch.Tensor:  # stored as the factor applied: Gemma's 1 + weight
        return need(name) + arch.norm_offset if arch.norm_offset else need(name)

    state = {"embed_tokens.weight": need("model.embed_tokens.weight"), "norm": norm("model.norm.weight")}
    lm_head = None if arch.tie_embeddings else get("lm_head.weight")
    if lm_head is not None:
        state["lm_head.weight"] = lm_head
    for i in range(num_layers):
        p = f"model.layers.{i}."
        qkv = [need(p + f"self_attn.{x}_proj.weight") for x in "qkv"]
        state[f"layers.{i}.qkv_proj.weight"] = torch.cat(qkv)
        if arch.qkv_bias:
            state[f"layers.{i}.qkv_proj.bias"] = torch.cat([need(p + f"self_attn.{x}_proj.bias") for x in "qkv"])
        state[f"layers.{i}.o_proj.weight"] = need(p + "self_attn.o_proj.weight")
        state[f"layers.{i}.input_norm"] = norm(p + "input_layernorm.weight")
        if arch.output_norms:  # Gemma: post_attention_layernorm normalizes the attention output
            state[f"layers.{i}.post_norm"] = norm(p + "pre_feedforward_layernorm.weight")
            state[f"layers.{i}.attn_out_norm"] = norm(p + "post_attention_layernorm.weight")
            state[f"layers.{i}.mlp_out_norm"] = norm(p + "post_feedforward_layernorm.weight")
        else:
            state[f"layers.{i}.post_norm"] = norm(p + "post_attention_layernorm.weight")
        if arch.qk_norm:
            state[f"layers.{i}.q_norm"] = norm(p + "self_attn.q_norm.weight")
            state[f"layers.{i}.k_norm"] = norm(p + "self_attn.k_norm.weight")
        state[f"layers.{i}.gate_up_proj.weight"] = torch.cat([need(p + "mlp.gate_proj.weight"), need(p + "mlp.up_proj.weight")])
        state[f"layers.{i}.down_proj.weight"] = need(p + "mlp.down_proj.weight")
    return state


def cpu_runs_bf16() -> bool:
    """Whether this CPU has bfloat16 matmuls in oneDNN (AVX-512 or AMX): 3-4x fp32 speed on
    avx512_bf16 parts; elsewhere bfloat16 is emulated and slower than float32."""
    try:
        return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a private torch API: absent means no
        return False


def auto_dtype(config: Any, quantized: bool, device: str) -> torch.dtype:
    """dtype "auto": bfloat16 on CUDA; on CPU, bfloat16 for a half-precision or quantized
    (GGUF) checkpoint when the CPU runs it natively, float32 otherwise (a float32 checkpoint
    stays float32)."""
    if device.startswith("cuda"):
        return torch.bfloat16
    saved = config.to_dict()  # "dtype" in transformers >= 4.56, "torch_dtype" before
    stored = str(saved.get("dtype") or saved.get("torch_dtype")).removeprefix("torch.")
    half = quantized or stored in ("bfloat16", "float16")
    return torch.bfloat16 if half and cpu_runs_bf16() else torch.float32


def load_model(
    reference: str,
    max_layers: int | None = None,
    dtype: torch.dtype | str = torch.float32,
    device: str = "cpu",
    load_tokenizer: bool = True,
) -> LoadedModel:
    """Load layers 0..max_layers-1 (all when None) of a model, with its tokenizer.

    `dtype` is a torch dtype, its name, or "auto" (see `auto_dtype`).
    """
    path = resolve_model_path(reference)
    config, tokenizer, header = _read_config_and_tokenizer(path, load_tokenizer)
    if dtype == "auto":
        dtype = auto_dtype(config, quantized=path.is_file(), device=device)
    elif isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    arch = ModelArch.from_hf_config(config)
    num_layers = arch.num_layers if max_layers is None else max_layers
    if not 1 <= num_layers <= arch.num_layers:
        raise ModelLoadError(f"max_layers={max_layers} is out of range: the model has {arch.num_layers} layers")
    try:
        state = _state_dict(_open_weights(path, arch, header), arch, num_layers)
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"cannot read the weights in {path} (corrupt or unsupported file?): {exc}") from exc
    inv_freq, rope_scaling = rope_inv_freq(config)
    with torch.device("meta"):
        model = DecoderModel(arch, num_layers, inv_freq, rope_scaling)
    state = {name: tensor.to(device=device, dtype=dtype) for name, tensor in state.items()}
    if "lm_head.weight" not in state:  # tied embeddings share one tensor
        state["lm_head.weight"] = state["embed_tokens.weight"]
    model.load_state_dict(state, assign=True, strict=True)
    model.inv_freq = inv_freq.to(device)
    return LoadedModel(model.eval(), arch, config, tokenizer, str(path))
