"""Hardware energy counters: RAPL (Linux powercap) for CPUs, NVML for NVIDIA GPUs. No Ray, no torch.

A meter reads a cumulative energy counter in joules. Where the machine exposes neither
counter (a VM, a container without /sys/class/powercap, a GPU without the energy API),
`open_meter` returns None and the energy metrics stay absent: energy is measured, never
estimated.

- RAPL: the package domains `/sys/class/powercap/intel-rapl:N/energy_uj` (AMD CPUs expose
  the same interface), summed over sockets; subdomains (core, uncore, dram) are parts of
  a package and are not added again. Each counter wraps at `max_energy_range_uj`. Since
  2020 kernels let only root read it; an unreadable counter counts as absent.
- NVML: `nvmlDeviceGetTotalEnergyConsumption` (millijoules since the driver loaded; Volta
  and newer) of the GPUs this process may use (CUDA_VISIBLE_DEVICES), from `nvidia-ml-py`,
  imported only when a GPU meter is asked for.

A RAPL package counter covers the whole socket, so on a machine shared by several replicas
each one's figure includes the others' draw: give each replica a machine (or a GPU) for a
per-model figure.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable

POWERCAP = Path("/sys/class/powercap")


class EnergyMeter:
    """A cumulative energy counter in joules (`read_joules` only grows)."""

    name = "meter"
    clock: Callable[[], float] = staticmethod(time.monotonic)

    def read_joules(self) -> float:
        raise NotImplementedError


class RaplMeter(EnergyMeter):
    name = "rapl"

    def __init__(self, domains: list[Path]):
        self.domains = domains
        self._max_uj = [int((d / "max_energy_range_uj").read_text()) for d in domains]
        self._last_uj = [self._read_uj(d) for d in domains]
        self._total_uj = 0

    @staticmethod
    def _read_uj(domain: Path) -> int:
        return int((domain / "energy_uj").read_text())

    def read_joules(self) -> float:
        for i, domain in enumerate(self.domains):
            now = self._read_uj(domain)
            delta = now - self._last_uj[i]
            if delta < 0:  # the counter wrapped past max_energy_range_uj
                delta += self._max_uj[i] + 1
            self._total_uj += delta
            self._last_uj[i] = now
        return self._total_uj / 1e6


def rapl_domains(root: Path = POWERCAP) -> list[Path]:
    """Readable RAPL package domains (intel-rapl:N, not its subdomains intel-rapl:N:M)."""
    domains = []
    for domain in sorted(root.glob("intel-rapl:*")):
        if domain.name.count(":") != 1:
            continue
        try:
            int((domain / "energy_uj").read_text())
            int((domain / "max_energy_range_uj").read_text())
        except (OSError, ValueError):  # absent, or root-only on this kernel
            continue
        domains.append(domain)
    return domains


class NvmlMeter(EnergyMeter):
    name = "nvml"

    def __init__(self, nvml, handles: list):
        self._nvml, self._handles = nvml, handles

    def read_joules(self) -> float:
        return sum(self._nvml.nvmlDeviceGetTotalEnergyConsumption(h) for h in self._handles) / 1e3


def _visible_gpu_handles(nvml) -> list:
    """NVML handles of the GPUs in CUDA_VISIBLE_DEVICES (indices or UUIDs; unset = all)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(nvml.nvmlDeviceGetCount())]
    handles = []
    for item in (v.strip() for v in visible.split(",") if v.strip()):
        if item.isdigit():
            handles.append(nvml.nvmlDeviceGetHandleByIndex(int(item)))
        else:
            handles.append(nvml.nvmlDeviceGetHandleByUUID(item))
    return handles


def open_nvml_meter() -> NvmlMeter | None:
    """A meter over this process's GPUs, or None without nvidia-ml-py, a driver or the energy API."""
    try:
        import pynvml as nvml  # nvidia-ml-py
    except ImportError:
        return None
    try:
        nvml.nvmlInit()
        handles = _visible_gpu_handles(nvml)
        for handle in handles:  # raises NVMLError_NotSupported on GPUs older than Volta
            nvml.nvmlDeviceGetTotalEnergyConsumption(handle)
    except nvml.NVMLError:
        return None
    return NvmlMeter(nvml, handles) if handles else None


def open_meter(gpu: bool, powercap: Path = POWERCAP) -> EnergyMeter | None:
    """The meter for a replica: NVML when it runs on GPUs, RAPL otherwise; None where absent."""
    if gpu:
        return open_nvml_meter()
    domains = rapl_domains(powercap)
    return RaplMeter(domains) if domains else None


class EnergyWindow:
    """Joules a meter counts over a `with` block, for benchmarks: None where no meter exists.

        with EnergyWindow(open_meter(gpu=False)) as window:
            run_benchmark()
        report["energy_joules"] = window.joules   # None: not measured, and said so
    """

    def __init__(self, meter: EnergyMeter | None):
        self.meter, self.joules = meter, None
        self._start = 0.0

    def __enter__(self) -> "EnergyWindow":
        if self.meter is not None:
            self._start = self.meter.read_joules()
        return self

    def __exit__(self, *exc) -> None:
        if self.meter is not None:
            self.joules = self.meter.read_joules() - self._start

    def per_token(self, tokens: int) -> float | None:
        return self.joules / tokens if self.joules is not None and tokens else None


def main() -> None:
    """`python -m telemetry.energy`: say which meters this machine exposes."""
    for label, meter in (("rapl", open_meter(gpu=False)), ("nvml", open_nvml_meter())):
        reading = f"{meter.read_joules():.3f} J so far" if meter is not None else "absent"
        print(f"{label}: {reading}")


if __name__ == "__main__":
    main()
