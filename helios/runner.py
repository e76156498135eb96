"""One engine step on the model: inputs from the scheduled chunks, the layer loop, early exits, KV fill.

The batch runs layer by layer. At an exit point the exit head scores the rows that produce
a token and are still running; rows that exit take their token from that head and stop
(``token`` policy), or all leave together once every one of them is confident (``batch``).

KV fill (CALM's state copy): an exited row's hidden state stays frozen, and every later
layer still runs its input norm and q/k/v projection over *all* rows, so the exited
rows' K/V for the skipped layers are written in the same matmul as the running rows'
(no separate loop); attention and the MLP run only for rows still running.

Models that mix sliding-window and full-attention layers (Gemma 3) keep two caches: one for
the full layers, read through `Sequence.block_table`, and one for the window layers, read
through `Sequence.window_table`, whose first entry is logical block `window_dropped` (the
older ones were freed). Each layer writes and reads its own cache with its own slots and
attention metadata; the window layers' positions count from their table's first block.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from helios.attention import AttentionMetadata, PrefillChunk, attention, decode_groups
from helios.block_manager import split_layers
from helios.early_exit import ExitState
from helios.exits import ExitHead
from helios.kv_cache import KVCache, slot_mapping
from helios.model import DecoderLayer, DecoderModel
from helios.scheduler import Chunk


@dataclass
class StepInputs:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    slot_mapping: torch.Tensor  # [T] flat cache slot of each row
    attention: AttentionMetadata
    sample_rows: torch.Tensor  # [S] rows that produce a token, in `sampled` order
    forced_exit: torch.Tensor | None  # [T] layers to run per row (replay after preemption)
    first_rows: list[int] | None = None  # indices into sample_rows giving a request's first token (length head)
    # the window layers' slots and attention (their own cache and block tables); None: no window pool
    window_slot_mapping: torch.Tensor | None = None
    window_attention: AttentionMetadata | None = None


@dataclass
class StepResult:
    logits: torch.Tensor  # [S, vocab] float32
    exit_layers: list[int]  # layers run per sampled row
    breaches: int  # rows that reached the last loaded layer of a prefix load unconfident
    # length prediction: {sampled index: predicted output tokens} for the first-token rows, and
    # the states it read ({layer: [len(first_rows), hidden]}) for the tuning tool
    predicted_lengths: dict[int, int] = field(default_factory=dict)
    length_states: dict[int, torch.Tensor] = field(default_factory=dict)


class ModelRunner:
    def __init__(self, model: DecoderModel, num_blocks: int, block_size: int, exit_heads: list[ExitHead],
                 policy: str, confidence: str, exit_profile: dict[int, float] | None = None, seed: int = 0,
                 num_window_blocks: int = 0, decode_kernel: str = "sdpa"):
        """`num_window_blocks`: the sliding-window layers' pool (helios/block_manager.py kv_pool_blocks);
        0 (or a model without both kinds of layers): every layer in one cache of `num_blocks`.
        `decode_kernel`: one of helios.attention.DECODE_KERNELS (the engine resolves its config's auto)."""
        arch, weight = model.arch, model.embed_tokens.weight
        self.model, self.block_size, self.device = model, block_size, weight.device
        full, window = split_layers([layer.sliding_window for layer in model.layers])
        if not num_window_blocks:
            full, window = list(range(len(model.layers))), []
        make = lambda layers, blocks: KVCache(len(layers), blocks, block_size, arch.num_kv_heads,  # noqa: E731
                                              arch.head_dim, weight.dtype, weight.device)
        self.cache = make(full, num_blocks)  # the full-attention layers (all layers without a window pool)
        self.window_cache = make(window, num_window_blocks) if window else None
        # per layer: (its cache, its index there, whether it reads the window tables)
        self.layer_caches: list[tuple[KVCache, int, bool]] = [None] * len(model.layers)
        for n, i in enumerate(full):
            self.layer_caches[i] = (self.cache, n, False)
        for n, i in enumerate(window):
            self.layer_caches[i] = (self.window_cache, n, True)
        self.policy, self.confidence = policy, confidence
        # exits strictly inside the loaded prefix; the last loaded layer always exits
        self.heads = {h.layer: h for h in exit_heads if h.layer < model.num_loaded_layers} if policy != "none" else {}
        # the last loaded layer's head: a tuned one if given, else the final norm + LM head
        self.last_head = next((h for h in exit_heads if h.layer == model.num_loaded_layers),
                              ExitHead(model.num_loaded_layers, threshold=0.0))
        self.prefix_mode = model.num_loaded_layers < arch.num_layers
        self.exit_profile = exit_profile
        self.generator = torch.Generator().manual_seed(seed)
        # response-length prediction (helios/length.py): the head, and the layers whose
        # first-token states prefill keeps (the head's, or the tuning tool's); empty: off
        self.length_head = None
        self.capture_layers: frozenset[int] = frozenset()
        self.decode_kernel = decode_kernel  # bench/decode_step_ab.py measures them
        # a layer's dense parts (norms, projections, RoPE, MLP); compile_layers() swaps in compiled ones
        self.layer_qkv, self.layer_finish = DecoderLayer.qkv, DecoderLayer.finish

    # K/V as [layers, blocks, block_size, kv_heads, head_dim] views (the cache itself is kv-head-major)
    # of the full-attention cache (every layer's without a window pool)
    @property
    def k_cache(self) -> torch.Tensor:
        return self.cache.k.permute(0, 2, 3, 1, 4)

    @property
    def v_cache(self) -> torch.Tensor:
        return self.cache.v.permute(0, 2, 3, 1, 4)

    # ---- inputs -------------------------------------------------------------------

    def prepare(self, chunks: list[Chunk]) -> tuple[StepInputs, list[Chunk]]:
        """The step's tensors, and the chunks that produce a token (in the order of the logits)."""
        decode = sorted((c for c in chunks if c.is_decode), key=lambda c: c.end)  # shortest context first
        prefill = [c for c in chunks if not c.is_decode]
        ids, positions, slots, forced = [], [], [], []
        for c in decode + prefill:
            seq = c.seq
            ids += seq.token_ids(c.start, c.end)
            positions += range(c.start, c.end)
            slots += slot_mapping(seq.block_table, self.block_size, c.start, c.end)
            forced += [seq.forced_exit(p) for p in range(c.start, c.end)] if seq.num_preemptions else [None] * (c.end - c.start)
        meta, sample_rows = self._attention_metadata(decode, prefill)
        forced_exit = None
        if any(f is not None for f in forced):
            last = self.model.num_loaded_layers + 1
            forced_exit = torch.tensor([last if f is None else f for f in forced], device=self.device)
        as_tensor = lambda x: torch.tensor(x, dtype=torch.long, device=self.device)  # noqa: E731
        sampled = [c for c in decode + prefill if c.sample]
        first_rows = [i for i, c in enumerate(sampled) if not c.seq.output_ids] if self.capture_layers else None
        inputs = StepInputs(as_tensor(ids), as_tensor(positions), as_tensor(slots), meta, as_tensor(sample_rows),
                            forced_exit, first_rows or None)
        if self.window_cache is not None:
            window_slots = []
            for c in decode + prefill:
                window_slots += slot_mapping(c.seq.window_table, self.block_size, c.start, c.end, c.seq.window_dropped)
            inputs.window_slot_mapping = as_tensor(window_slots)
            inputs.window_attention, _ = self._attention_metadata(decode, prefill, windowed=True)
        return inputs, sampled

    def _attention_metadata(self, decode: list[Chunk], prefill: list[Chunk], windowed: bool = False
                            ) -> tuple[AttentionMetadata, list[int]]:
        """Metadata over the block tables, or with `windowed` over the window tables. Positions count
        from a table's first block: a window table that dropped its oldest blocks is read as if the
        sequence began there (the masks are relative and RoPE is already in the keys)."""
        bs = self.block_size
        if windowed:
            tables, ctx = [c.seq.window_table for c in decode], [c.end - c.seq.window_dropped * bs for c in decode]
        else:
            tables, ctx = [c.seq.block_table for c in decode], [c.end for c in decode]
        blocks_used = [-(-n // bs) for n in ctx]
        max_blocks = max(blocks_used, default=0)
        decode_blocks = torch.tensor([table[:max_blocks] + [0] * (max_blocks - n)
                                      for table, n in zip(tables, blocks_used)], dtype=torch.long
                                     ).view(len(decode), max_blocks)
        ctx_lens = torch.tensor(ctx, dtype=torch.long)
        decode_mask = torch.arange(max_blocks * bs)[None, :] < ctx_lens[:, None]
        chunks, row, sample_rows = [], len(decode), list(range(len(decode)))
        for c in prefill:
            table, off = (c.seq.window_table, c.seq.window_dropped * bs) if windowed else (c.seq.block_table, 0)
            blocks = torch.tensor(table[: -(-(c.end - off) // bs)], dtype=torch.long, device=self.device)
            chunks.append(PrefillChunk(row, row + c.end - c.start, blocks, c.start - off, c.end - off))
            row += c.end - c.start
            if c.sample:
                sample_rows.append(row - 1)
        meta = AttentionMetadata(len(decode), decode_blocks.to(self.device), decode_mask.to(self.device),
                                 decode_groups(blocks_used), chunks, ctx_lens.to(self.device), self.decode_kernel)
        return meta, sample_rows

    # ---- the step -----------------------------------------------------------------

    @torch.inference_mode()
    def run(self, inp: StepInputs) -> StepResult:
        model = self.model
        hidden = model.embed_tokens(inp.input_ids)
        cos, sin = model.rope(inp.positions)
        exits = ExitState(model, hidden, inp.sample_rows, self.policy, self.confidence,
                          self._draw_targets(len(inp.sample_rows)))
        all_alive = True
        states: dict[int, torch.Tensor] = {}  # length head: first-token rows' states by layer
        for index, layer in enumerate(model.layers):
            cache, at, windowed = self.layer_caches[index]
            slots, meta = (inp.window_slot_mapping, inp.window_attention) if windowed else (inp.slot_mapping,
                                                                                          inp.attention)
            q, k, v = self.layer_qkv(layer, hidden, cos, sin)  # every row: this is also the KV fill of exited rows
            cache.write(at, slots, k, v)
            if all_alive:
                hidden = self.layer_finish(layer, hidden, attention(cache, at, q, meta, None, layer.sliding_window))
            elif bool(exits.alive.any()):
                rows = exits.alive.nonzero().squeeze(1)
                attn = attention(cache, at, q, meta, rows[rows < meta.num_decode], layer.sliding_window)
                hidden = hidden.index_copy(0, rows, self.layer_finish(layer, hidden[rows], attn[rows]))
            ran = index + 1
            if inp.first_rows is not None and ran in self.capture_layers:
                states[ran] = hidden[inp.sample_rows[inp.first_rows]]
            if inp.forced_exit is not None:
                exits.force(inp.forced_exit, ran)
                all_alive = bool(exits.alive.all())
            head = self.heads.get(ran)
            if head is not None:
                exits.check(head, hidden)
                all_alive = bool(exits.alive.all())
        logits, unconfident = exits.finish(self.last_head, hidden)
        return StepResult(logits, exits.exit_layers, unconfident if self.prefix_mode else 0,
                          self._predict_lengths(inp, states), states)

    def compile_layers(self, warmup_rows: tuple[int, ...] = (1, 8)) -> float:
        """Compile the layers' dense parts with inductor, one graph for every row count (dynamic
        shapes: only 1 row gets its own), and run them once per entry of `warmup_rows` so that
        compiling happens here, not in the first request. Returns the seconds it took."""
        start = time.perf_counter()
        self.layer_qkv = torch.compile(DecoderLayer.qkv, dynamic=True)
        self.layer_finish = torch.compile(DecoderLayer.finish, dynamic=True)
        model, layer = self.model, self.model.layers[0]
        with torch.inference_mode():
            for rows in warmup_rows:
                hidden = model.embed_tokens(torch.zeros(rows, dtype=torch.long, device=self.device))
                cos, sin = model.rope(torch.arange(rows, device=self.device))
                q, _, _ = self.layer_qkv(layer, hidden, cos, sin)
                self.layer_finish(layer, hidden, q.flatten(1))
        return time.perf_counter() - start

    def _predict_lengths(self, inp: StepInputs, states: dict[int, torch.Tensor]) -> dict[int, int]:
        """{sampled index: predicted length} from the states kept this step (a few small matmuls)."""
        head = self.length_head
        if head is None or inp.first_rows is None or any(layer not in states for layer in head.layers):
            return {}
        return dict(zip(inp.first_rows, head.predict([states[layer] for layer in head.layers])))

    def _draw_targets(self, num_sample: int) -> torch.Tensor | None:
        """Synthetic mode: each sampled row's exit layer, drawn from the profile."""
        if not self.exit_profile:
            return None
        layers = torch.tensor(list(self.exit_profile), device=self.device)
        weights = torch.tensor(list(self.exit_profile.values()), dtype=torch.float)
        return layers[torch.multinomial(weights, num_sample, replacement=True, generator=self.generator).to(self.device)]
