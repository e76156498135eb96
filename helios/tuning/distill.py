"""Self-distillation data for exit heads: the model's own greedy continuations, and the hidden
states at the exit layers that produced each continuation token (computed once, then cached).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from helios.model import DecoderModel, rms_norm

logger = logging.getLogger("helios.tune")


@dataclass
class DistillSet:
    """Per exit layer, the hidden state [N, hidden] of every continuation token's predecessor row;
    `final` is the state after the last layer (the teacher), `tokens` the full-depth greedy token."""

    hidden: dict[int, torch.Tensor]
    final: torch.Tensor
    tokens: torch.Tensor
    sequence_ids: torch.Tensor  # which continuation each row belongs to (for splits by prompt)

    def __len__(self) -> int:
        return len(self.tokens)

    def subset(self, rows: torch.Tensor) -> "DistillSet":
        return DistillSet({layer: h[rows] for layer, h in self.hidden.items()}, self.final[rows], self.tokens[rows],
                          self.sequence_ids[rows])


@torch.inference_mode()
def hidden_states(model: DecoderModel, ids: list[int], layers: list[int]) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """A dense causal forward over one sequence: the state after each of `layers` layers, and after all."""
    device = model.embed_tokens.weight.device
    positions = torch.arange(len(ids), device=device)
    hidden = model.embed_tokens(torch.tensor(ids, device=device))
    cos, sin = model.rope(positions)
    wanted, captured = set(layers), {}
    for index, layer in enumerate(model.layers):
        q, k, v = layer.qkv(hidden, cos, sin)
        attn = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                              v.transpose(0, 1)[None], is_causal=True, enable_gqa=True)
        hidden = layer.finish(hidden, attn[0].transpose(0, 1).reshape(len(ids), -1))
        if index + 1 in wanted:
            captured[index + 1] = hidden
    return captured, hidden


@torch.inference_mode()
def full_depth_tokens(model: DecoderModel, prompt_ids: list[int], output_ids: list[int]) -> torch.Tensor:
    """The full model's greedy token after each prefix of `output_ids` (teacher-forced)."""
    _, final = hidden_states(model, prompt_ids + output_ids[:-1], [])
    features = rms_norm(final[len(prompt_ids) - 1:], model.norm, model.arch.rms_norm_eps)
    return model.lm_head(features).argmax(-1).cpu()


def same_prefix_agreement(model: DecoderModel, outputs) -> float:
    """Share of generated tokens equal to full depth's greedy token after the same tokens."""
    matched = total = 0
    for out in outputs:
        if out.token_ids:
            full = full_depth_tokens(model, out.prompt_token_ids, out.token_ids)
            matched += int((full == torch.tensor(out.token_ids)).sum())
            total += len(out.token_ids)
    return matched / max(1, total)


def build_distill_set(llm, prompts: list, exits: list[int], max_tokens: int, progress: bool = True) -> DistillSet:
    """Greedy full-depth continuations of `prompts` (chat messages or text), then their exit states."""
    from helios.sampling_params import SamplingParams

    started = time.monotonic()
    outputs = llm.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0), use_tqdm=progress)
    logger.info("generated %d continuations (%d tokens) in %.0f s", len(outputs),
                sum(len(o.token_ids) for o in outputs), time.monotonic() - started)
    model = llm.engine.model
    hidden: dict[int, list] = {layer: [] for layer in exits}
    finals, tokens, owners = [], [], []
    for number, out in enumerate(_progress(outputs, progress, "caching exit states")):
        if not out.token_ids:
            continue
        ids = out.prompt_token_ids + out.token_ids
        captured, final = hidden_states(model, ids[:-1], exits)
        rows = slice(len(out.prompt_token_ids) - 1, len(ids) - 1)  # the rows that produced the continuation
        for layer in exits:
            hidden[layer].append(captured[layer][rows].float().cpu())  # cached on the host; batches move
        finals.append(final[rows].float().cpu())
        tokens.append(torch.tensor(out.token_ids))
        owners.append(torch.full((len(out.token_ids),), number))
    return DistillSet({layer: torch.cat(h) for layer, h in hidden.items()}, torch.cat(finals), torch.cat(tokens),
                      torch.cat(owners))


def _progress(items, enabled: bool, desc: str):
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="seq")
