"""One engine step on the model: paged attention, early exits and KV fill.

Rows of a step are laid out as [decode rows, shortest context first | prefill chunk rows];
decode rows attend in groups of similar context length. The batch runs layer
by layer. At an exit point the exit head scores the rows that produce a token and are
still running; rows that exit take their token from that head and stop (``token``
policy), or all leave together once every one of them is confident (``batch`` policy).

KV fill (CALM's state copy): an exited row's hidden state stays frozen, and every later
layer still runs its input norm and q/k/v projection over *all* rows, so the exited
rows' K/V for the skipped layers are written in the same matmul as the running rows'
(no separate loop); attention and the MLP run only for rows still running.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from helios.block_manager import BlockManager
from helios.exits import ExitHead, probability_confidence, saturation
from helios.model import DecoderModel
from helios.scheduler import Chunk


@dataclass
class StepInputs:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    slot_mapping: torch.Tensor  # [T] flat cache slot of each row
    num_decode: int  # rows 0..num_decode-1 are single-token decodes
    decode_blocks: torch.Tensor  # [num_decode, max_blocks] block tables (padded with 0)
    decode_mask: torch.Tensor  # [num_decode, max_blocks * block_size] valid context
    decode_groups: list[tuple[int, int, int]]  # (row start, row end, blocks): decode rows by context length
    prefill: list[tuple[int, int, torch.Tensor, int, int]]  # (row start, row end, blocks, ctx start, ctx len)
    sample_rows: torch.Tensor  # [S] rows that produce a token, in chunk order
    forced_exit: torch.Tensor | None  # [T] layers to run per row (replay after preemption)


@dataclass
class StepResult:
    logits: torch.Tensor  # [S, vocab] float32
    exit_layers: list[int]  # layers run per sampled row
    breaches: int  # rows that reached the last loaded layer of a prefix load unconfident


class ModelRunner:
    def __init__(self, model: DecoderModel, num_blocks: int, block_size: int, exit_heads: list[ExitHead],
                 policy: str, confidence: str, exit_profile: dict[int, float] | None = None, seed: int = 0):
        arch, weight = model.arch, model.embed_tokens.weight
        self.model, self.block_size = model, block_size
        shape = (model.num_loaded_layers, num_blocks, block_size, arch.num_kv_heads, arch.head_dim)
        self.k_cache = torch.zeros(shape, dtype=weight.dtype, device=weight.device)
        self.v_cache = torch.zeros(shape, dtype=weight.dtype, device=weight.device)
        self.device = weight.device
        self.policy, self.confidence = policy, confidence
        # exits strictly inside the loaded prefix; the last loaded layer always exits
        self.heads = {h.layer: h for h in exit_heads if h.layer < model.num_loaded_layers} if policy != "none" else {}
        # the last loaded layer's head: a tuned one if given, else the final norm + LM head
        self.last_head = next((h for h in exit_heads if h.layer == model.num_loaded_layers),
                              ExitHead(model.num_loaded_layers, threshold=0.0))
        self.prefix_mode = model.num_loaded_layers < arch.num_layers
        self.exit_profile = exit_profile
        self.generator = torch.Generator().manual_seed(seed)

    # ---- inputs -------------------------------------------------------------------

    def prepare(self, chunks: list[Chunk], blocks: BlockManager) -> tuple[StepInputs, list[Chunk]]:
        decode = sorted((c for c in chunks if c.is_decode), key=lambda c: c.end)  # shortest context first
        prefill = [c for c in chunks if not c.is_decode]
        ordered = decode + prefill
        ids, positions, slots, forced = [], [], [], []
        for c in ordered:
            all_ids = c.seq.all_ids
            ids += all_ids[c.start:c.end]
            positions += range(c.start, c.end)
            slots += blocks.slots(c.seq, c.start, c.end)
            forced += [c.seq.forced_exit(p) for p in range(c.start, c.end)] if c.seq.num_preemptions else [None] * (c.end - c.start)
        max_blocks = max((len(c.seq.block_table) for c in decode), default=0)
        decode_blocks = torch.tensor([c.seq.block_table + [0] * (max_blocks - len(c.seq.block_table)) for c in decode],
                                     dtype=torch.long).view(len(decode), max_blocks)
        ctx_lens = torch.tensor([c.end for c in decode], dtype=torch.long)
        decode_mask = torch.arange(max_blocks * self.block_size)[None, :] < ctx_lens[:, None]
        decode_groups = self._decode_groups([blocks.blocks_for(c.end) for c in decode])
        prefill_meta, row, sample_rows = [], len(decode), list(range(len(decode)))
        for c in prefill:
            table = torch.tensor(c.seq.block_table[: blocks.blocks_for(c.end)], dtype=torch.long)
            prefill_meta.append((row, row + c.end - c.start, table.to(self.device), c.start, c.end))
            row += c.end - c.start
            if c.sample:
                sample_rows.append(row - 1)
        num_layers = self.model.num_loaded_layers
        forced_exit = None
        if any(f is not None for f in forced):
            forced_exit = torch.tensor([num_layers + 1 if f is None else f for f in forced], device=self.device)
        as_tensor = lambda x: torch.tensor(x, dtype=torch.long, device=self.device)  # noqa: E731
        inputs = StepInputs(as_tensor(ids), as_tensor(positions), as_tensor(slots), len(decode),
                            decode_blocks.to(self.device), decode_mask.to(self.device), decode_groups,
                            prefill_meta, as_tensor(sample_rows), forced_exit)
        return inputs, [c for c in ordered if c.sample]

    @staticmethod
    def _decode_groups(num_blocks: list[int], min_rows: int = 16, max_groups: int = 4) -> list[tuple[int, int, int]]:
        """Split decode rows (sorted by context) into groups of at least `min_rows`, each attending
        over its own longest context rather than the batch's: the K/V gather is the larger part of
        decode attention here, and with contexts of mixed length a third of it was padding."""
        count = len(num_blocks)
        groups = max(1, min(max_groups, count // min_rows))
        bounds = [round(i * count / groups) for i in range(groups + 1)]
        return [(start, end, num_blocks[end - 1]) for start, end in zip(bounds, bounds[1:]) if end > start]

    # ---- attention ----------------------------------------------------------------

    def _write_kv(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k_cache[layer].view(-1, *k.shape[1:]).index_copy_(0, slots, k)
        self.v_cache[layer].view(-1, *v.shape[1:]).index_copy_(0, slots, v)

    def _gather(self, layer: int, block_tables: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V of whole blocks, [B, Hkv, blocks * block_size, D]."""
        b, n = block_tables.shape
        flat = block_tables.flatten()
        k, v = self.k_cache[layer].index_select(0, flat), self.v_cache[layer].index_select(0, flat)
        shape = (b, n * self.block_size, *k.shape[2:])
        return k.view(shape).transpose(1, 2), v.view(shape).transpose(1, 2)

    def _attention(self, layer: int, q: torch.Tensor, inp: StepInputs, decode_rows: torch.Tensor | None) -> torch.Tensor:
        """Attention output [T, H*D]; decode rows only where `decode_rows` (None = all) say."""
        decode = self._decode_attention(layer, q, inp, decode_rows)
        if decode is not None and decode_rows is None and not inp.prefill:
            return decode  # a decode-only step with every row running: no scatter into a buffer
        out = torch.zeros(q.shape[0], q.shape[1] * q.shape[2], dtype=q.dtype, device=q.device)
        if decode is not None:
            out[slice(0, inp.num_decode) if decode_rows is None else decode_rows] = decode
        for start, end, table, ctx_start, ctx_len in inp.prefill:
            k, v = self._gather(layer, table[None])
            k, v = k[:, :, :ctx_len], v[:, :, :ctx_len]
            qs = q[start:end].transpose(0, 1)[None]
            if ctx_start == 0:
                o = F.scaled_dot_product_attention(qs, k, v, is_causal=True, enable_gqa=True)
            else:
                q_pos = torch.arange(ctx_start, ctx_len, device=q.device)
                mask = torch.arange(ctx_len, device=q.device)[None, :] <= q_pos[:, None]
                o = F.scaled_dot_product_attention(qs, k, v, attn_mask=mask, enable_gqa=True)
            out[start:end] = o[0].transpose(0, 1).reshape(end - start, -1)
        return out

    def _decode_attention(self, layer: int, q: torch.Tensor, inp: StepInputs,
                          rows: torch.Tensor | None) -> torch.Tensor | None:
        """[R, H*D] for the decode rows `rows` (ascending; None = all), attended one length group
        at a time, each over its own longest context; None if there are no such rows."""
        span, outs = self.block_size, []
        for start, end, blocks in inp.decode_groups:
            picked = slice(start, end) if rows is None else rows[(rows >= start) & (rows < end)]
            if rows is None or len(picked):  # slices for all rows: views, not index copies
                outs.append(self._paged_decode(layer, q[picked], inp.decode_blocks[picked, :blocks],
                                               inp.decode_mask[picked, :blocks * span]))
        return None if not outs else outs[0] if len(outs) == 1 else torch.cat(outs)

    def _paged_decode(self, layer: int, q: torch.Tensor, blocks: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """One-token attention of rows q [R, H, D] over their block tables: [R, H*D]."""
        k, v = self._gather(layer, blocks)
        # A kv head's query heads become its query rows: SDPA then sees no GQA and one
        # [group x context] problem per (row, kv head), several times faster on CPU than a
        # one-row query with enable_gqa. Query head h reads kv head h // group.
        grouped = q.view(len(q), k.shape[1], -1, q.shape[2])
        return F.scaled_dot_product_attention(grouped, k, v, attn_mask=mask[:, None, None, :]).reshape(len(q), -1)

    # ---- the step -----------------------------------------------------------------

    @torch.inference_mode()
    def run(self, inp: StepInputs) -> StepResult:
        model = self.model
        hidden = model.embed_tokens(inp.input_ids)
        cos, sin = model.rope(inp.positions)
        num_rows, num_sample = hidden.shape[0], len(inp.sample_rows)
        alive = torch.ones(num_rows, dtype=torch.bool, device=self.device)
        all_alive = True
        logits = torch.empty(num_sample, model.arch.vocab_size, device=self.device)
        # exited rows' LM-head inputs: one LM-head pass at the end serves them all, since on
        # weight-bound hardware each extra pass costs its full weight read
        features = torch.empty(num_sample, model.arch.hidden_size, dtype=hidden.dtype, device=self.device)
        has_logits = torch.zeros(num_sample, dtype=torch.bool, device=self.device)
        exit_layers = [model.num_loaded_layers] * num_sample
        sample_alive = torch.ones(num_sample, dtype=torch.bool, device=self.device)
        previous = hidden[inp.sample_rows] if self.confidence == "saturation" else None
        targets = self._draw_targets(num_sample)

        for index, layer in enumerate(model.layers):
            q, k, v = layer.qkv(hidden, cos, sin)  # every row: this is also the KV fill of exited rows
            self._write_kv(index, inp.slot_mapping, k, v)
            if all_alive:
                hidden = layer.finish(hidden, self._attention(index, q, inp, None))
            elif alive.any():
                rows = alive.nonzero().squeeze(1)
                decode_rows = rows[rows < inp.num_decode]
                attn = self._attention(index, q, inp, decode_rows)
                hidden = hidden.index_copy(0, rows, layer.finish(hidden[rows], attn[rows]))
            ran = index + 1
            if inp.forced_exit is not None:
                alive &= inp.forced_exit > ran
                all_alive = bool(alive.all())
            head = self.heads.get(ran)
            if head is not None and sample_alive.any():
                previous = self._exit_check(head, hidden, inp, alive, sample_alive, logits, has_logits, features,
                                            exit_layers, previous, targets)
                all_alive = bool(alive.all())

        remaining = sample_alive.nonzero().squeeze(1)
        if len(remaining):
            final = hidden[inp.sample_rows[remaining]]
            features[remaining] = self.last_head.features(model, final)
        need = (~has_logits).nonzero().squeeze(1)
        if len(need) == num_sample:
            logits = model.lm_head(features).float()
        elif len(need):
            logits[need] = model.lm_head(features[need]).float()
        breaches = len(remaining) if self.prefix_mode else 0
        return StepResult(logits, exit_layers, breaches)

    def _draw_targets(self, num_sample: int) -> torch.Tensor | None:
        """Synthetic mode: each sampled row's exit layer, drawn from the profile."""
        if not self.exit_profile:
            return None
        layers = torch.tensor(list(self.exit_profile), device=self.device)
        weights = torch.tensor(list(self.exit_profile.values()), dtype=torch.float)
        return layers[torch.multinomial(weights, num_sample, replacement=True, generator=self.generator).to(self.device)]

    def _exit_check(self, head: ExitHead, hidden, inp: StepInputs, alive, sample_alive, logits, has_logits,
                    features, exit_layers, previous, targets):
        """Score the running sampled rows at `head`; let the confident ones exit."""
        candidates = sample_alive.nonzero().squeeze(1)
        cand_hidden = hidden[inp.sample_rows[candidates]]
        head_logits = None
        if self.confidence in ("max_prob", "margin"):
            head_logits = head.logits(self.model, cand_hidden)
            confident = probability_confidence(head_logits, self.confidence) >= head.threshold
        elif self.confidence == "saturation":
            confident = saturation(cand_hidden, previous[candidates]) >= head.threshold
            previous = previous.index_copy(0, candidates, cand_hidden)
        else:
            confident = head.classifier_score(self.model, cand_hidden) >= head.threshold
        if targets is not None:  # synthetic: the check ran; the profile decides
            confident = targets[candidates] <= head.layer
        if self.policy == "batch":
            confident = confident if bool(confident.all()) else torch.zeros_like(confident)
        if not bool(confident.any()):
            return previous
        leaving = candidates[confident]
        if head_logits is not None:  # the check already paid for them
            logits[leaving], has_logits[leaving] = head_logits[confident], True
        else:
            features[leaving] = head.features(self.model, cand_hidden[confident])
        for row in leaving.tolist():
            exit_layers[row] = head.layer
        sample_alive[leaving] = False
        alive[inp.sample_rows[leaving]] = False
        return previous
