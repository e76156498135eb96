"""What every benchmark reports beside its figures: the machine it ran on."""

from __future__ import annotations

import os
import platform

import torch


def machine() -> dict:
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu_cores": os.cpu_count(), "memory_gib": round(mem, 1), "gpu": gpu, "torch": torch.__version__,
            "platform": platform.platform()}
