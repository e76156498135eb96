"""Tiny random-weight Hugging Face models, saved to disk, for engine correctness tests."""

from __future__ import annotations

from pathlib import Path

import torch

ARCHS = ("llama", "llama3", "qwen2", "mistral", "gemma3")
# Gemma 3 in small: local (sliding-window) and global layers with their own RoPE bases, a softmax
# scale that is not head_dim ** -0.5, and a window wider than the contexts most tests use
GEMMA3_WINDOW = 32
GEMMA3 = dict(head_dim=16, query_pre_attn_scalar=24, sliding_window=GEMMA3_WINDOW,
              layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
              rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                               "full_attention": {"rope_type": "default", "rope_theta": 1000000.0}},
              hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True)


def tiny_config(arch: str = "llama", **overrides):
    from transformers import Gemma3TextConfig, LlamaConfig, MistralConfig, Qwen2Config

    common = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    if arch == "llama3":
        common["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                     "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                     "original_max_position_embeddings": 64}
    if arch == "gemma3":
        common.update(GEMMA3)
    common.update(overrides)
    if arch == "gemma3":
        return Gemma3TextConfig(**common)
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
            elif arch == "gemma3":  # Gemma's norms scale by 1 + weight, which starts at zero
                p.normal_(0, 0.3)
    model.save_pretrained(folder, safe_serialization=True)
    return model.eval()


CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TOKENIZER_TEXT = (
    "The capital of France is Paris. Helios serves early-exit language models on Ray Serve. "
    "Once upon a time, a tiny model answered questions about the weather, numbers 0123456789, "
    "and the quick brown fox that jumps over the lazy dog."
)


def build_tiny_tokenizer(folder: Path, vocab_size: int = 300):
    """A byte-level BPE tokenizer with a ChatML template, built offline; returns it.

    Its ids stay below `vocab_size`, so a tiny model of that vocabulary can serve text.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator([TOKENIZER_TEXT] * 4, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                        unk_token="<|endoftext|>", pad_token="<|endoftext|>")
    tokenizer.chat_template = CHATML_TEMPLATE
    tokenizer.save_pretrained(folder)
    return tokenizer


def build_tiny_chat_model(folder: Path, arch: str = "llama", seed: int = 0, **overrides):
    """A tiny model plus tokenizer and chat template: enough to serve text end to end."""
    tokenizer = build_tiny_tokenizer(folder)
    settings = dict(vocab_size=len(tokenizer), max_position_embeddings=4096, bos_token_id=tokenizer.bos_token_id,
                    eos_token_id=tokenizer.eos_token_id)
    settings.update(overrides)
    return build_tiny_model(folder, arch, seed, **settings)
