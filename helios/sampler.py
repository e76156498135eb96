"""Turn the logits of the rows that produce a token into tokens (and logprobs)."""

from __future__ import annotations

import torch

from helios.sequence import Sequence


def _filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        drop = cumulative - torch.softmax(sorted_logits, dim=-1) >= top_p  # keep the token that crosses top_p
        drop[0] = False  # the most likely token always stays (a top_p that rounds to 0 would drop every one)
        logits = logits.masked_fill(drop.scatter(0, order, drop), float("-inf"))
    return logits


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> tuple[list[int], list[dict | None]]:
    """One token per row of `logits` [B, vocab] (float32), with that row's sampling params."""
    tokens = logits.argmax(dim=-1).tolist()
    for row, seq in enumerate(seqs):
        p = seq.params
        if p.greedy:
            continue
        row_logits = _filter_top_k_top_p(logits[row] / p.temperature, p.top_k, p.top_p)
        probs = torch.softmax(row_logits, dim=-1)
        tokens[row] = int(torch.multinomial(probs, 1, generator=seq.generator).item())
    logprobs: list[dict | None] = [None] * len(seqs)
    wanted = [row for row, seq in enumerate(seqs) if seq.params.logprobs is not None]
    if wanted:
        log_probs = torch.log_softmax(logits[wanted], dim=-1)
        for i, row in enumerate(wanted):
            top = torch.topk(log_probs[i], seqs[row].params.logprobs) if seqs[row].params.logprobs else None
            logprobs[row] = {
                "token_id": tokens[row],
                "logprob": float(log_probs[i, tokens[row]]),
                "top": [] if top is None else list(zip(top.indices.tolist(), top.values.tolist())),
            }
    return tokens, logprobs
