"""What every benchmark shares: the machine it ran on, its energy meter, and the median of alternated runs."""

from __future__ import annotations

import functools
import os
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from telemetry.energy import EnergyMeter, EnergyWindow, open_meter  # noqa: E402


def median_run(runs: list, key):
    """The run whose `key` is the median (the upper one of an even count): a real run, not a mix."""
    return sorted(runs, key=key)[len(runs) // 2]


def machine() -> dict:
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    meter = energy_meter()
    return {"cpu_cores": os.cpu_count(), "memory_gib": round(mem, 1), "gpu": gpu, "torch": torch.__version__,
            "platform": platform.platform(), "energy_meter": meter.name if meter is not None else None}


@functools.lru_cache(maxsize=None)
def energy_meter() -> EnergyMeter | None:
    """The machine's energy counter (NVML with a GPU, RAPL otherwise), opened once per process so
    that counter wraps are followed; None where it has neither (then no figure is reported)."""
    return open_meter(gpu=torch.cuda.is_available())


def energy_window() -> EnergyWindow:
    """Joules over a `with` block; `.joules` stays None where the machine has no meter."""
    return EnergyWindow(energy_meter())
