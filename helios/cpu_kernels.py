"""Helios's own CPU kernels (helios/csrc), built on first use and loaded once per process: decode
attention over the paged cache (paged_decode.cpp) and linear layers over GGUF blocks (gguf_linear.cpp,
used by helios/linears.py).

Why our own attention kernel: decode attention read the paged cache through a gather that copied every
row's context per layer per step; the packages that ship a CPU paged-attention kernel do not
fit this torch (intel-extension-for-pytorch's latest is built for torch 2.8), and FlexAttention
runs on CPU only through torch.compile (minutes of compile on 2 cores; an inductor-fused gather
measured 1.2x on one layer, bench/results/README.md). The kernels are two C++ files built by
torch.utils.cpp_extension (about 30 s with g++, cached under TORCH_EXTENSIONS_DIR, default
~/.cache/torch_extensions, in a folder per CPU feature set and source version, since they are
built for the CPU they run on); without a compiler Helios falls back to the PyTorch paths and
says so.
"""

from __future__ import annotations

import hashlib
import logging
import platform
import threading
import time
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SOURCES = [Path(__file__).with_name("csrc") / name for name in ("paged_decode.cpp", "gguf_linear.cpp")]
# -fopenmp: at::parallel_for is an OpenMP loop inlined from the headers (without the flag it runs
# on one thread). The link step has no -fopenmp, so its GOMP symbols resolve to the runtime
# libtorch_cpu already loaded: one thread pool, sized by torch.set_num_threads.
# -ffast-math lets the dot products and exp vectorize; glibc's libmvec provides the vector expf.
CFLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp"]
LDFLAGS = ["-lmvec"] if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc" else []

_lock = threading.Lock()
_built: dict[str, object] = {}  # "op": the op, or None after a failed build; "error": why


def paged_decode_op():
    """`torch.ops.helios.paged_decode`, building the extension the first time; None if it cannot be built
    (`build_error()` says why). Called per layer per step: after the first call it takes no lock."""
    if "op" in _built:
        return _built["op"]
    with _lock:
        if "op" not in _built:
            _built["op"] = _build()
        return _built["op"]


def build_error() -> str | None:
    return _built.get("error")


def gguf_pack_op():
    """`torch.ops.helios.gguf_pack` (its sibling `gguf_linear` is built with it), or None where the kernels
    cannot be built."""
    return None if paged_decode_op() is None else torch.ops.helios.gguf_pack


def _build():
    from torch.utils.cpp_extension import load

    started = time.perf_counter()
    logger.info("loading Helios's CPU kernels (built once per machine, about 30 s)")
    try:
        load(name=f"helios_cpu_kernels_{_build_tag()}", sources=[str(source) for source in SOURCES],
             extra_cflags=CFLAGS, extra_ldflags=LDFLAGS, is_python_module=False)
    except Exception as exc:  # no compiler, no ninja, unwritable cache: the PyTorch path still works
        _built["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
        logger.warning("Helios's CPU kernels unavailable (%s); decode attention uses SDPA and linear layers "
                       "oneDNN or PyTorch", _built["error"])
        return None
    logger.info("Helios's CPU kernels ready in %.1f s", time.perf_counter() - started)
    return torch.ops.helios.paged_decode


def _build_tag() -> str:
    """A short hash of the CPU's feature flags and of every file in csrc: a build made with -march=native
    on one CPU is never loaded on another (a home folder shared by a cluster's nodes), and a changed
    header gets its own build (torch's own check covers the listed sources only)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = next((line for line in cpuinfo if line.startswith("flags")), "")
    except OSError:
        flags = ""
    digest = hashlib.sha1(f"{platform.machine()} {platform.processor()} {flags}".encode())
    for path in sorted(SOURCES[0].parent.iterdir()):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:8]


def resolve_decode_kernel(choice: str, device: str, head_dim: int) -> str:
    """The decode kernel (helios.attention.DECODE_KERNELS) that EngineConfig.decode_kernel `choice` means on
    `device`: auto is paged on CPU when the kernel builds and takes the head size (a multiple of 8; 1.3-1.7x
    a batch-64 decode step on 2 cores, bench/results/README.md), else sdpa."""
    on_cpu = torch.device(device).type == "cpu"
    fits = head_dim % 8 == 0 and head_dim <= 512  # the kernel's vectors are 8 floats wide
    if choice == "auto":
        return "paged" if on_cpu and fits and paged_decode_op() is not None else "sdpa"
    if choice == "paged":
        if not on_cpu:
            raise ValueError(f"decode_kernel 'paged' is a CPU kernel; on {device} use auto or sdpa")
        if not fits:
            raise ValueError(f"decode_kernel 'paged' needs a head_dim that is a multiple of 8, at most 512 "
                             f"(this model's is {head_dim}); use auto or sdpa")
        if paged_decode_op() is None:
            raise RuntimeError(f"decode_kernel 'paged': the kernel could not be built ({build_error()}); "
                               "use auto or sdpa")
    return choice
