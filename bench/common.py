"""What every benchmark shares: the machine it ran on, and the median of alternated runs."""

from __future__ import annotations

import os
import platform

import torch


def median_run(runs: list, key):
    """The run whose `key` is the median (the upper one of an even count): a real run, not a mix."""
    return sorted(runs, key=key)[len(runs) // 2]


def machine() -> dict:
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu_cores": os.cpu_count(), "memory_gib": round(mem, 1), "gpu": gpu, "torch": torch.__version__,
            "platform": platform.platform()}
