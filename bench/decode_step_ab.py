"""A decode step of the engine, old vs new runner, alternated in one process (A/B of a change).

    python bench/decode_step_ab.py --baseline ba9ea1b --contexts 128,256,512 --dtypes bfloat16,float32 \
        --rounds 5 --json bench/results/decode_step_ab.json

One model is loaded per dtype and shared by every variant: `baseline` is ModelRunner with the
attention and KV cache of git revision `--baseline` (its runner.py, attention.py, kv_cache.py,
cpu_kernels.py and C++ kernel, loaded from git as a side package; `--baseline-kernel` picks its
decode kernel); `sdpa` and `matmul` are this checkout's runner
with that decode kernel (`KERNEL+onednn`: and its linear layers packed for oneDNN, on a copy of
the model; `KERNEL+gguf`: the same, and calls of few rows on the GGUF file's blocks);
`--compile` adds `matmul+compile` (the layers' dense parts compiled by inductor). Each context length gets `--batch` decode rows of contexts spread over
[0.75 L, L] with shuffled block tables and the same random K/V in every variant's cache.
Each round runs every variant in turn (the order rotates) and keeps its best of `--steps`
steps (prepare + run). Time is the process's CPU time with torch on one thread (the machine
is shared: wall time moved 5x between rounds at a load average of 50, CPU time far less);
wall time is kept beside it. Reported: the median round per variant, every round's ratio
baseline / variant, and the largest logit difference from the baseline (on random K/V that
attend sharply, bf16 rounding differences grow through 30 layers: the correctness tests,
not this figure, check logits).
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from common import machine  # noqa: E402
from helios.linears import pack_linears  # noqa: E402
from helios.loader import load_model  # noqa: E402
from helios.runner import ModelRunner  # noqa: E402
from helios.sampling_params import SamplingParams  # noqa: E402
from helios.scheduler import Chunk  # noqa: E402
from helios.sequence import Sequence  # noqa: E402

BASE_MODULES = ("kv_cache", "attention", "runner", "model", "cpu_kernels")


def baseline_runner_class(revision: str):
    """ModelRunner of `revision`, its kv_cache/attention/runner (and its C++ kernels, built under their own
    op namespace `helios_base`) imported as `helios_base.*`; modules the revision did not have yet stay
    this checkout's."""
    folder = Path(tempfile.mkdtemp()) / "helios_base"
    (folder / "csrc").mkdir(parents=True)
    (folder / "__init__.py").write_text("")
    sources = {name: git_show(revision, f"helios/{name}.py") for name in BASE_MODULES}
    present = [name for name, source in sources.items() if source is not None]
    for name in present:
        source = sources[name]
        for other in present:
            source = source.replace(f"from helios.{other} import", f"from helios_base.{other} import")
        source = source.replace("torch.ops.helios.", "torch.ops.helios_base.").replace(
            'name=f"helios_', 'name=f"helios_base_')
        (folder / f"{name}.py").write_text(source)
    listed = subprocess.run(["git", "-C", str(ROOT), "ls-tree", "--name-only", f"{revision}:helios/csrc"],
                            capture_output=True, text=True)
    for file in listed.stdout.split() if listed.returncode == 0 else []:  # its C++ kernels, own op namespace
        kernel = git_show(revision, f"helios/csrc/{file}")
        for macro in ("TORCH_LIBRARY", "TORCH_LIBRARY_FRAGMENT"):
            kernel = kernel.replace(f"{macro}(helios,", f"{macro}(helios_base,")
        (folder / "csrc" / file).write_text(kernel)
    sys.path.insert(0, str(folder.parent))
    return importlib.import_module("helios_base.runner").ModelRunner


def git_show(revision: str, path: str) -> str | None:
    shown = subprocess.run(["git", "-C", str(ROOT), "show", f"{revision}:{path}"], capture_output=True, text=True)
    return shown.stdout if shown.returncode == 0 else None


def decode_chunks(batch: int, context: int, block_size: int, num_blocks: int, vocab: int,
                  seed: int) -> list[Chunk]:
    """`batch` one-token decodes with contexts in [0.75 L, L] and shuffled block tables."""
    gen = torch.Generator().manual_seed(seed)
    lengths = (context - torch.randint(0, context // 4 + 1, (batch,), generator=gen)).tolist()
    free = torch.randperm(num_blocks, generator=gen).tolist()
    chunks = []
    for i, length in enumerate(lengths):
        seq = Sequence(str(i), torch.randint(0, vocab, (length - 1,), generator=gen).tolist(),
                       SamplingParams(max_tokens=1 << 20))
        seq.output_ids = [int(torch.randint(0, vocab, (1,), generator=gen))]
        need = -(-length // block_size)
        seq.block_table, free = free[:need], free[need:]
        chunks.append(Chunk(seq, length - 1, length))
    return chunks


def fill_cache(runner, reference: torch.Tensor, which: str) -> None:
    """The same values in every variant's cache: `reference` is [layers, blocks, block_size, kv_heads, dim]."""
    cache = getattr(runner.cache, which)
    cache.copy_(reference if cache.shape == reference.shape else reference.permute(0, 3, 1, 2, 4))


def best_step(runner, chunks: list[Chunk], steps: int) -> tuple[float, float, torch.Tensor]:
    """CPU and wall seconds of the fastest of `steps` decode steps (prepare + run), and its logits."""
    times, logits = [], None
    for _ in range(steps):
        cpu, wall = time.process_time(), time.perf_counter()
        inputs, _ = runner.prepare(chunks)
        logits = runner.run(inputs).logits
        times.append((time.process_time() - cpu, time.perf_counter() - wall))
    return *min(times), logits


def make_variants(model, num_blocks: int, block_size: int, baseline: str, baseline_kernel: str | None,
                  compile_step: bool, kernels: tuple[str, ...], rows_hint: int) -> dict:
    variants = {"baseline": baseline_runner_class(baseline)(model, num_blocks, block_size, [], "none", "max_prob")}
    if baseline_kernel:  # a revision with several decode kernels: which one is the baseline
        variants["baseline"].decode_kernel = baseline_kernel
    packed = {}  # linear kernel -> a packed copy, so that the other variants keep nn.Linear
    for name in kernels:
        kernel, _, linears = name.partition("+")
        if linears and linears not in packed:
            packed[linears] = copy.deepcopy(model)
            pack_linears(packed[linears], rows_hint, linears)
        runner = ModelRunner(packed.get(linears, model), num_blocks, block_size, [], "none", "max_prob")
        runner.decode_kernel = kernel
        variants[name] = runner
    if compile_step:
        runner = ModelRunner(model, num_blocks, block_size, [], "none", "max_prob")
        seconds = runner.compile_layers()
        print(f"compile + warm-up: {seconds:.1f} s", flush=True)
        runner.compile_seconds = seconds
        variants["matmul+compile"] = runner
    return variants


def run_dtype(args, dtype: str) -> dict:
    model = load_model(args.model, dtype=dtype, load_tokenizer=False).model
    arch, bs = model.arch, args.block_size
    num_blocks = args.batch * (max(args.contexts) // bs + 1) + 8
    variants = make_variants(model, num_blocks, bs, args.baseline, args.baseline_kernel, args.compile,
                             tuple(args.kernels.split(",")), args.batch)
    for which in ("k", "v"):
        ref = torch.randn(model.num_loaded_layers, num_blocks, bs, arch.num_kv_heads, arch.head_dim,
                          generator=torch.Generator().manual_seed(1 if which == "k" else 2))
        ref = ref.to(model.embed_tokens.weight.dtype)
        for runner in variants.values():
            fill_cache(runner, ref, which)
    rows = []
    for context in args.contexts:
        chunks = decode_chunks(args.batch, context, bs, num_blocks, arch.vocab_size, seed=context)
        names, rounds, walls = list(variants), [], []
        for runner in variants.values():  # untimed: first-call costs (allocations, kernel set-up)
            best_step(runner, chunks, 1)
        for r in range(args.rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            timed = {name: best_step(variants[name], chunks, args.steps) for name in order}
            rounds.append({name: t for name, (t, _, _) in timed.items()})
            walls.append({name: t for name, (_, t, _) in timed.items()})
            if r == 0:
                base = timed["baseline"][2]
                diffs = {name: float((lg - base).abs().max()) for name, (_, _, lg) in timed.items()}
            print(dtype, context, {n: round(1e3 * t, 1) for n, t in rounds[-1].items()}, flush=True)
        row = {"context": context, "batch": args.batch, "max_abs_logit_diff_vs_baseline": diffs,
               "median_cpu_ms": {n: round(1e3 * statistics.median(r[n] for r in rounds), 1) for n in names},
               "median_wall_ms": {n: round(1e3 * statistics.median(r[n] for r in walls), 1) for n in names},
               "ratio_baseline_over": {n: [round(r["baseline"] / r[n], 2) for r in rounds]
                                       for n in names if n != "baseline"}}
        row["median_ratio"] = {n: round(statistics.median(v), 2) for n, v in row["ratio_baseline_over"].items()}
        rows.append(row)
        print(json.dumps(row), flush=True)
    extra = {"compile_seconds": round(variants["matmul+compile"].compile_seconds, 1)} if args.compile else {}
    return {"dtype": dtype, "rows": rows, **extra}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--baseline", default="HEAD", help="git revision whose runner is the baseline")
    parser.add_argument("--baseline-kernel", help="the baseline runner's decode kernel (default: the revision's default)")
    parser.add_argument("--contexts", type=lambda s: [int(x) for x in s.split(",")], default=[128, 256, 512])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=2, help="steps per variant per round (the best is kept)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--kernels", default="paged,sdpa,matmul",
                        help="this checkout's decode kernels to time; KERNEL+onednn: with the linear layers packed "
                             "for oneDNN, KERNEL+gguf: and few-row calls on GGUF blocks (helios/linears.py)")
    parser.add_argument("--compile", action="store_true", help="add the compiled variant")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load = Path("/proc/loadavg").read_text().split()[:3]
    results = [run_dtype(args, dtype) for dtype in args.dtypes.split(",")]
    result = {"command": " ".join(sys.argv), "machine": machine(), "threads": args.threads,
              "loadavg_start": load, "loadavg_end": Path("/proc/loadavg").read_text().split()[:3], "results": results}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
