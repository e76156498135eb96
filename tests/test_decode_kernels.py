"""Decode attention kernels: `paged` (the C++ kernel reading the cache in place) and `matmul`
equal `sdpa` (and a float64 reference) on a paged cache, with sliding windows, ragged contexts
and shuffled block tables; `auto` picks the kernel, and falls back when it cannot be built."""

import pytest
import torch

from helios import cpu_kernels
from helios.attention import DECODE_KERNELS, AttentionMetadata, attention, decode_groups
from helios.cpu_kernels import resolve_decode_kernel
from helios.kv_cache import KVCache

HEADS, KV_HEADS, DIM, BLOCK = 6, 2, 16, 4


def paged_case(dtype: torch.dtype, lengths: list[int], kernel: str, seed: int = 0):
    """A cache with random K/V, decode rows with `lengths` (ascending) over shuffled blocks."""
    gen = torch.Generator().manual_seed(seed)
    blocks_used = [-(-n // BLOCK) for n in lengths]
    num_blocks = sum(blocks_used) + 3
    cache = KVCache(1, num_blocks, BLOCK, KV_HEADS, DIM, dtype, torch.device("cpu"))
    cache.k.copy_(torch.randn(cache.k.shape, generator=gen))
    cache.v.copy_(torch.randn(cache.v.shape, generator=gen))
    free, width = torch.randperm(num_blocks, generator=gen).tolist(), max(blocks_used)
    tables = []
    for n in blocks_used:
        tables.append(free[:n] + [0] * (width - n))
        free = free[n:]
    ctx = torch.tensor(lengths)
    meta = AttentionMetadata(len(lengths), torch.tensor(tables), torch.arange(width * BLOCK)[None] < ctx[:, None],
                             decode_groups(blocks_used, min_rows=2), [], ctx, kernel)
    q = (3 * torch.randn(len(lengths), HEADS, DIM, generator=gen)).to(dtype)
    return cache, meta, q


def reference(cache: KVCache, meta: AttentionMetadata, q: torch.Tensor, window: int | None) -> torch.Tensor:
    """Row by row in float64: softmax(q k / sqrt(d)) v over the row's positions."""
    out = []
    for row, length in enumerate(meta.decode_ctx_lens.tolist()):
        k, v = cache.gather(0, meta.decode_blocks[row:row + 1])
        first = 0 if window is None else max(0, length - window)
        k, v = k[0, :, first:length].double(), v[0, :, first:length].double()  # [Hkv, n, D]
        qh = q[row].double().view(KV_HEADS, -1, DIM)
        probs = torch.softmax(qh @ k.transpose(1, 2) / DIM**0.5, dim=-1)
        out.append((probs @ v).reshape(-1))
    return torch.stack(out)


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_kernels_match_reference(window, dtype, tolerance):
    lengths = [1, 3, 4, 9, 13, 17, 17, 30]
    outs = {}
    for kernel in DECODE_KERNELS:
        cache, meta, q = paged_case(dtype, lengths, kernel)
        outs[kernel] = attention(cache, 0, q, meta, None, window)
        expected = reference(cache, meta, q, window)
        assert (outs[kernel].double() - expected).abs().max() < tolerance, kernel
    for kernel in ("matmul", "paged"):
        assert (outs[kernel].double() - outs["sdpa"].double()).abs().max() < tolerance, kernel


def test_kernels_on_a_subset_of_rows():
    """Rows still running after early exits: only those rows are computed, in place."""
    outs = {}
    for kernel in DECODE_KERNELS:
        cache, meta, q = paged_case(torch.float32, [2, 5, 8, 11, 20, 21], kernel, seed=1)
        outs[kernel] = attention(cache, 0, q, meta, torch.tensor([1, 4, 5]))
    for kernel in ("matmul", "paged"):
        assert torch.allclose(outs[kernel], outs["sdpa"], atol=1e-5), kernel
        assert outs[kernel][[0, 2, 3]].abs().max() == 0  # rows not asked for stay zero


def test_paged_kernel_reads_a_long_context_of_many_blocks():
    """head_dim 64 (a compiled-in size), 9 query heads over 3 kv heads, 300-700 positions."""
    gen = torch.Generator().manual_seed(3)
    lengths, block = [300, 517, 700], 16
    cache = KVCache(2, 140, block, 3, 64, torch.float32, torch.device("cpu"))
    cache.k.copy_(torch.randn(cache.k.shape, generator=gen))
    cache.v.copy_(torch.randn(cache.v.shape, generator=gen))
    tables = torch.randperm(140, generator=gen)[:3 * 44].view(3, 44)
    ctx = torch.tensor(lengths)
    q = torch.randn(3, 9, 64, generator=gen)
    outs = {}
    for kernel in ("paged", "sdpa"):
        meta = AttentionMetadata(3, tables, torch.arange(44 * block)[None] < ctx[:, None],
                                 decode_groups([-(-n // block) for n in lengths], min_rows=1), [], ctx, kernel)
        outs[kernel] = attention(cache, 1, q, meta, None, 256)
    assert torch.allclose(outs["paged"], outs["sdpa"], atol=1e-5)


def test_auto_picks_the_paged_kernel_on_cpu_and_falls_back_without_it(monkeypatch):
    assert resolve_decode_kernel("auto", "cpu", 64) == "paged"  # g++ and ninja are here
    assert resolve_decode_kernel("auto", "cuda", 64) == "sdpa"
    assert resolve_decode_kernel("matmul", "cpu", 64) == "matmul"
    with pytest.raises(ValueError, match="CPU kernel"):
        resolve_decode_kernel("paged", "cuda", 64)
    assert resolve_decode_kernel("auto", "cpu", 20) == "sdpa"  # its vectors are 8 floats wide
    with pytest.raises(ValueError, match="multiple of 8"):
        resolve_decode_kernel("paged", "cpu", 20)
    monkeypatch.setattr(cpu_kernels, "_built", {"op": None, "error": "no compiler"})
    assert resolve_decode_kernel("auto", "cpu", 64) == "sdpa"
    with pytest.raises(RuntimeError, match="no compiler"):
        resolve_decode_kernel("paged", "cpu", 64)


def test_paged_kernel_rescales_when_a_later_block_holds_the_largest_score():
    """The online softmax: a key far ahead of the others in the last block (and in the first)."""
    cache, meta, q = paged_case(torch.float32, [7, 15, 29], "paged", seed=2)
    for row, length in enumerate([7, 15, 29]):
        for position in (0, length - 1):
            block = meta.decode_blocks[row, position // BLOCK]
            cache.k[0, :, block, position % BLOCK] = 4 * q[row].view(KV_HEADS, -1, DIM)[:, 0]
        got = attention(cache, 0, q, meta, None)
        assert (got.double() - reference(cache, meta, q, None)).abs().max() < 1e-5


def test_write_then_gather_round_trips():
    cache = KVCache(2, 5, BLOCK, KV_HEADS, DIM, torch.float32, torch.device("cpu"))
    k, v = torch.randn(3, KV_HEADS, DIM), torch.randn(3, KV_HEADS, DIM)
    cache.write(1, torch.tensor([9, 2, 17]), k, v)  # blocks 2, 0, 4
    got_k, got_v = cache.gather(1, torch.tensor([[2], [0], [4]]))  # [3, Hkv, BLOCK, D]
    assert torch.equal(got_k[0, :, 1], k[0]) and torch.equal(got_k[1, :, 2], k[1]) and torch.equal(got_v[2, :, 1], v[2])
