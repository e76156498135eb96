"""A Llama-family decoder in plain PyTorch that steps layer by layer.

Covers Llama 2/3 (RoPE with Llama 3 scaling), SmolLM2, Mistral and Qwen2 (bias on
q/k/v): grouped-query attention, tied or untied embeddings. Gemma 3 adds q/k RMSNorm,
norms on the attention and MLP outputs, a GELU-tanh gated MLP, embeddings scaled by
sqrt(hidden), its own attention scale, and per-layer-type RoPE bases (local layers with a
sliding window, global layers without). The model owns weights and the per-layer math;
batching, the KV cache layout, attention masks (including sliding windows, which the
model only declares: `DecoderLayer.sliding_window`) and exits live in the runner, so one
layer can be called on any subset of the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "gemma3_text")
ACTIVATIONS = {"silu": F.silu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


@dataclass(frozen=True)
class ModelArch:
    """The shape facts the engine needs, read from a transformers config."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int  # depth of the model as trained
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position: int
    qkv_bias: bool
    tie_embeddings: bool
    hidden_act: str = "silu"
    embed_scale: float = 1.0  # Gemma multiplies embeddings by sqrt(hidden_size)
    attn_scale: float | None = None  # softmax scale when not head_dim ** -0.5 (Gemma: query_pre_attn_scalar ** -0.5)
    qk_norm: bool = False  # RMSNorm of each q/k head before RoPE (Gemma 3)
    output_norms: bool = False  # RMSNorm of the attention and MLP outputs before each residual add (Gemma 2/3)
    norm_offset: float = 0.0  # norms scale by (offset + weight): Gemma stores weight - 1
    layer_types: tuple[str, ...] = ()  # per layer, e.g. "sliding_attention" / "full_attention"; () = all alike
    layer_windows: tuple[int | None, ...] = ()  # per layer: attend to the last N positions (self included); None = all

    @classmethod
    def from_hf_config(cls, config) -> "ModelArch":
        model_type = getattr(config, "model_type", None)
        if model_type not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"unsupported architecture {model_type!r}: Helios runs {', '.join(SUPPORTED_ARCHITECTURES)} decoders"
            )
        num_heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
        for cap in ("attn_logit_softcapping", "final_logit_softcapping"):
            if getattr(config, cap, None) is not None:  # Gemma 2 style; Gemma 3 has none
                raise ValueError(f"unsupported: {cap}={getattr(config, cap)} (Helios has no logit soft-capping)")
        gemma = model_type == "gemma3_text"
        layer_types = tuple(getattr(config, "layer_types", None) or ())
        window = getattr(config, "sliding_window", None)
        scalar = getattr(config, "query_pre_attn_scalar", None)
        return cls(
            model_type=model_type,
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_layers=config.num_hidden_layers,
            num_heads=num_heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or num_heads,
            head_dim=head_dim,
            rms_norm_eps=config.rms_norm_eps,
            max_position=config.max_position_embeddings,
            qkv_bias=model_type == "qwen2" or bool(getattr(config, "attention_bias", False)),
            tie_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            hidden_act=getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", "silu"),
            embed_scale=config.hidden_size**0.5 if gemma else 1.0,
            attn_scale=scalar**-0.5 if gemma and scalar else None,
            qk_norm=gemma,
            output_norms=gemma,
            norm_offset=1.0 if gemma else 0.0,
            layer_types=layer_types,
            layer_windows=tuple(window if kind == "sliding_attention" else None for kind in layer_types),
        )

    @property
    def rope_kinds(self) -> tuple[str, ...]:
        """Layer types with their own RoPE table, in table order (empty: one table for all)."""
        return tuple(sorted(set(self.layer_types))) if self.model_type == "gemma3_text" else ()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm exactly as transformers computes it (statistics in float32)."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def rope_inv_freq(config) -> tuple[torch.Tensor, float | torch.Tensor]:
    """Inverse frequencies and attention scaling, using transformers' RoPE variants.

    Models with RoPE parameters per layer type (Gemma 3: local and global bases) get one row
    per type, in `ModelArch.rope_kinds` order, and one scaling per type.
    """
    kinds = ModelArch.from_hf_config(config).rope_kinds
    if kinds:
        tables = [_rope_table(config, config.rope_parameters[kind], kind) for kind in kinds]
        return torch.stack([t[0] for t in tables]), torch.tensor([t[1] for t in tables])
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return _rope_table(config, params, None)


def _rope_table(config, params: dict, layer_type: str | None) -> tuple[torch.Tensor, float]:
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        base = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        return inv_freq, 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise ValueError(f"unsupported RoPE type {rope_type!r}")
    extra = {"layer_type": layer_type} if layer_type else {}
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu", **extra)
    return inv_freq.float(), float(scaling)


def _norm_weight(size: int) -> nn.Parameter:
    return nn.Parameter(torch.ones(size))


class DecoderLayer(nn.Module):
    """One pre-norm decoder layer with fused q/k/v and gate/up projections.

    Norm weights are stored as the factor applied (Gemma's 1 + weight is folded in at load),
    so every norm is the same `rms_norm`.
    """

    def __init__(self, arch: ModelArch, index: int = 0):
        super().__init__()
        self.arch = arch
        q_size, kv_size = arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
        self.qk_size = q_size + kv_size  # q and k lead the fused projection's output, v follows
        self.input_norm = _norm_weight(arch.hidden_size)
        self.qkv_proj = nn.Linear(arch.hidden_size, q_size + 2 * kv_size, bias=arch.qkv_bias)
        self.o_proj = nn.Linear(q_size, arch.hidden_size, bias=False)
        self.post_norm = _norm_weight(arch.hidden_size)  # before the MLP
        self.gate_up_proj = nn.Linear(arch.hidden_size, 2 * arch.intermediate_size, bias=False)
        self.down_proj = nn.Linear(arch.intermediate_size, arch.hidden_size, bias=False)
        self.act = ACTIVATIONS[arch.hidden_act]
        if arch.qk_norm:
            self.q_norm, self.k_norm = _norm_weight(arch.head_dim), _norm_weight(arch.head_dim)
        if arch.output_norms:
            self.attn_out_norm, self.mlp_out_norm = _norm_weight(arch.hidden_size), _norm_weight(arch.hidden_size)
        # the runner folds the softmax scale head_dim ** -0.5 into attention: other scales pre-scale q
        self.q_scale = 1.0 if arch.attn_scale is None else arch.attn_scale * arch.head_dim**0.5
        layer_type = arch.layer_types[index] if arch.layer_types else None
        self.rope_index = arch.rope_kinds.index(layer_type) if arch.rope_kinds else 0
        # what the attention must honour: keys of the last `sliding_window` positions only (None: all)
        self.sliding_window = arch.layer_windows[index] if arch.layer_windows else None

    def qkv(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """Rotated q [T, H, D] and k, v [T, Hkv, D] of the rows in `hidden` [T, hidden].

        cos/sin are [T, D], or [kinds, T, D] for models with a RoPE table per layer type, as
        `DecoderModel.rope` makes them (sin with its first half negated).
        """
        a = self.arch
        x = rms_norm(hidden, self.input_norm, a.rms_norm_eps)
        y = self.qkv_proj(x)
        # q and k are rotated together, as one [T, H + Hkv, D] view: half the small ops of two rotations
        qk = y[:, :self.qk_size].view(-1, a.num_heads + a.num_kv_heads, a.head_dim)
        v = y[:, self.qk_size:].view(-1, a.num_kv_heads, a.head_dim)
        if a.qk_norm:
            q, k = qk.split((a.num_heads, a.num_kv_heads), dim=1)
            qk = torch.cat((rms_norm(q, self.q_norm, a.rms_norm_eps), rms_norm(k, self.k_norm, a.rms_norm_eps)), 1)
        if cos.dim() == 3:
            cos, sin = cos[self.rope_index], sin[self.rope_index]
        # transformers' x * cos + rotate_half(x) * sin, where rotate_half(x) = cat(-x2, x1): the roll
        # gives cat(x2, x1) and the sign is in sin's first half, so every product is the same
        qk = qk * cos.unsqueeze(1) + qk.roll(a.head_dim // 2, -1) * sin.unsqueeze(1)
        q, k = qk.split((a.num_heads, a.num_kv_heads), dim=1)
        if self.q_scale != 1.0:
            q = q * self.q_scale
        return q, k, v

    def finish(self, hidden: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        """Residual after attention, then the MLP block: the new hidden state."""
        eps = self.arch.rms_norm_eps
        attn = self.o_proj(attn_out)
        if self.arch.output_norms:
            attn = rms_norm(attn, self.attn_out_norm, eps)
        hidden = hidden + attn
        x = rms_norm(hidden, self.post_norm, eps)
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        mlp = self.down_proj(self.act(gate) * up)
        if self.arch.output_norms:
            mlp = rms_norm(mlp, self.mlp_out_norm, eps)
        return hidden + mlp


class ScaledEmbedding(nn.Embedding):
    """Embeddings times a constant, rounded to the weights' dtype first as transformers does (Gemma)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, scale: float):
        super().__init__(num_embeddings, embedding_dim)
        self.scale = scale

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return super().forward(input_ids) * torch.tensor(self.scale, dtype=self.weight.dtype)


class DecoderModel(nn.Module):
    """Embeddings, the loaded prefix of decoder layers, the final norm and LM head."""

    def __init__(self, arch: ModelArch, num_loaded_layers: int, inv_freq: torch.Tensor,
                 rope_scaling: float | torch.Tensor):
        super().__init__()
        self.arch = arch
        self.num_loaded_layers = num_loaded_layers
        self.embed_tokens = (nn.Embedding(arch.vocab_size, arch.hidden_size) if arch.embed_scale == 1.0
                             else ScaledEmbedding(arch.vocab_size, arch.hidden_size, arch.embed_scale))
        self.layers = nn.ModuleList(DecoderLayer(arch, i) for i in range(num_loaded_layers))
        self.norm = nn.Parameter(torch.ones(arch.hidden_size))
        self.lm_head = nn.Linear(arch.hidden_size, arch.vocab_size, bias=False)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.rope_scaling = rope_scaling

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [T, head_dim] of `positions`, sin with its first half negated (what
        `DecoderLayer.qkv` rotates with); [kinds, T, head_dim] with a table per layer type."""
        freqs = positions.float()[..., :, None] * self.inv_freq[..., None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        dtype = self.embed_tokens.weight.dtype
        scaling = self.rope_scaling
        if isinstance(scaling, torch.Tensor):
            scaling = scaling.to(emb.device)[:, None, None]
        sin = (emb.sin() * scaling).to(dtype)
        half = sin.shape[-1] // 2
        return (emb.cos() * scaling).to(dtype), torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
