"""Tiny random-weight Hugging Face models, saved to disk, for engine correctness tests."""

from __future__ import annotations

from pathlib import Path

import torch

ARCHS = ("llama", "llama3", "qwen2", "mistral")


def tiny_config(arch: str = "llama", **overrides):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    common = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    if arch == "llama3":
        common["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                     "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                     "original_max_position_embeddings": 64}
    common.update(overrides)
    if arch == "qwen2":
        return Qwen2Config(**common)
    if arch == "mistral":
        return MistralConfig(**common)
    return LlamaConfig(**common)


def build_tiny_model(folder: Path, arch: str = "llama", seed: int = 0, **overrides):
    """Save a random-weight model to `folder`; return the transformers model (float32, eval)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **overrides), torch_dtype=torch.float32)
    # random init is too tame: scale so that logits differ clearly between tokens
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0, 0.08)
    model.save_pretrained(folder, safe_serialization=True)
    return model.eval()
