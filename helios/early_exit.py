"""The exit decision of one step: which sampled rows leave at which exit, and their logits.

`ExitState` holds a step's exit bookkeeping in one object: the rows still running, the
rows that already have their logits, the LM-head inputs of exited rows (one LM-head pass at
the end serves them all, since on weight-bound hardware each extra pass costs its full
weight read) and each sampled row's exit layer.
"""

from __future__ import annotations

import torch

from helios.exits import ExitHead, probability_confidence, saturation
from helios.model import DecoderModel


class ExitState:
    def __init__(self, model: DecoderModel, hidden: torch.Tensor, sample_rows: torch.Tensor, policy: str,
                 confidence: str, targets: torch.Tensor | None):
        num_sample, device = len(sample_rows), hidden.device
        self.model, self.sample_rows, self.policy, self.confidence = model, sample_rows, policy, confidence
        self.alive = torch.ones(hidden.shape[0], dtype=torch.bool, device=device)  # every row still running
        self.sample_alive = torch.ones(num_sample, dtype=torch.bool, device=device)  # sampled rows still running
        self.logits = torch.empty(num_sample, model.arch.vocab_size, device=device)
        self.has_logits = torch.zeros(num_sample, dtype=torch.bool, device=device)
        self.features = torch.empty(num_sample, model.arch.hidden_size, dtype=hidden.dtype, device=device)
        self.exit_layers = [model.num_loaded_layers] * num_sample
        self.targets = targets  # synthetic mode: each sampled row's exit layer, drawn beforehand
        # saturation compares a row's state between consecutive exit points
        self.previous = hidden[sample_rows] if confidence == "saturation" else None

    def force(self, forced_exit: torch.Tensor, ran: int) -> None:
        """Rows replayed after preemption stop where their first run stopped."""
        self.alive &= forced_exit > ran

    def check(self, head: ExitHead, hidden: torch.Tensor) -> None:
        """Score the running sampled rows at `head`; let the confident ones exit."""
        if not bool(self.sample_alive.any()):
            return
        candidates = self.sample_alive.nonzero().squeeze(1)
        cand_hidden = hidden[self.sample_rows[candidates]]
        head_logits, confident = self._confidence(head, cand_hidden, candidates)
        if self.targets is not None:  # synthetic: the check ran; the profile decides
            confident = self.targets[candidates] <= head.layer
        if self.policy == "batch":
            confident = confident if bool(confident.all()) else torch.zeros_like(confident)
        if not bool(confident.any()):
            return
        leaving = candidates[confident]
        if head_logits is not None:  # the check already paid for them
            self.logits[leaving], self.has_logits[leaving] = head_logits[confident], True
        else:
            self.features[leaving] = head.features(self.model, cand_hidden[confident])
        for row in leaving.tolist():
            self.exit_layers[row] = head.layer
        self.sample_alive[leaving] = False
        self.alive[self.sample_rows[leaving]] = False

    def _confidence(self, head: ExitHead, cand_hidden: torch.Tensor,
                    candidates: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(the head's logits when the measure needed them, whether each candidate is confident)."""
        if self.confidence in ("max_prob", "margin"):
            head_logits = head.logits(self.model, cand_hidden)
            return head_logits, probability_confidence(head_logits, self.confidence) >= head.threshold
        if self.confidence == "saturation":
            confident = saturation(cand_hidden, self.previous[candidates]) >= head.threshold
            self.previous = self.previous.index_copy(0, candidates, cand_hidden)
            return None, confident
        return None, head.classifier_score(self.model, cand_hidden) >= head.threshold

    def finish(self, last_head: ExitHead, hidden: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Every row still running exits at the last loaded layer; (logits [S, vocab], rows that did)."""
        remaining = self.sample_alive.nonzero().squeeze(1)
        if len(remaining):
            self.features[remaining] = last_head.features(self.model, hidden[self.sample_rows[remaining]])
        need = (~self.has_logits).nonzero().squeeze(1)
        logits = self.logits
        if len(need) == len(logits):
            logits = self.model.lm_head(self.features).float()
        elif len(need):
            logits[need] = self.model.lm_head(self.features[need]).float()
        return logits, len(remaining)
