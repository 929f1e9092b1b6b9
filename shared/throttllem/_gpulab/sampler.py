"""NVML for the GPU lab: read-only, through the one NVML backend (`throttllem._gpu.nvml`).

A pass must never wait for NVML: two reads (SM clock, energy counter) cost about 5 ms on the
lent machine, as much as a decode pass. So `NvmlSampler` reads both in a thread every
`period_s` and a pass takes the latest clock and the last period's board power. The backend
is opened with ``dry_run=True``: the lab never calls an NVML setter.
"""

from __future__ import annotations

import math
import threading
import time
from typing import Any

from throttllem._errors import GpuError
from throttllem._gpu.nvml import NvmlBackend, NvmlLib, probe


def open_nvml(*, lib: NvmlLib | None = None) -> NvmlBackend:
    """The lab's NVML backend: reads only (dry-run, so no setter can ever be called)."""
    return NvmlBackend(dry_run=True, lib=lib)


def nvml_index_of_cuda_device(nvml: NvmlBackend, torch: Any, device: int) -> int:
    """The NVML index of CUDA device `device`, matched by UUID (NVML counts in PCI order and
    ignores CUDA_VISIBLE_DEVICES); the CUDA index itself when the UUID is not found."""
    try:
        return nvml.index_of_uuid(str(torch.cuda.get_device_properties(device).uuid))
    except GpuError:
        return device


def describe_gpu(index: int, *, lib: NvmlLib | None = None) -> dict[str, Any]:
    """What the run's metadata records about the card (name, driver, clocks, power limit);
    an NVML failure is recorded, never raised: metadata must not fail a measurement."""
    try:
        return probe(index, lib=lib)
    except GpuError as e:
        return {"index": index, "describe_error": str(e)}


class NvmlSampler:
    """Reads the SM clock and the energy counter of one GPU every `period_s` in a thread.

    `latest()` is the last (clock MHz, board power W over the last period); `clocks_mhz`
    holds every clock read, for the median clock of a measurement window. The first reads
    happen in the constructor, so a GPU without these counters fails at once; later failed
    reads are counted (`failed_reads`) and skipped.
    """

    def __init__(self, nvml: NvmlBackend, index: int, period_s: float = 0.02) -> None:
        self.nvml = nvml
        self.index = index
        self.period_s = period_s
        self._stop = threading.Event()
        self._lock = threading.Lock()
        clock, energy = nvml.sm_clock_mhz(index), nvml.energy_mj(index)
        self._last = (time.perf_counter(), clock, energy)
        self._power = math.nan
        self.clocks_mhz: list[float] = [clock]
        self.reads = 1
        self.failed_reads = 0
        self._thread = threading.Thread(target=self._run, name="nvml-sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            try:
                clock = self.nvml.sm_clock_mhz(self.index)
                energy = self.nvml.energy_mj(self.index)
            except GpuError:
                self.failed_reads += 1
                continue
            self.record(time.perf_counter(), clock, energy)

    def record(self, now_s: float, clock_mhz: float, energy_mj: float) -> None:
        """Take one reading (the thread's; public so the arithmetic is testable alone)."""
        with self._lock:
            t0, _, e0 = self._last
            if now_s > t0 and energy_mj >= e0:
                self._power = (energy_mj - e0) / 1e3 / (now_s - t0)
            self._last = (now_s, clock_mhz, energy_mj)
            self.clocks_mhz.append(clock_mhz)
            self.reads += 1

    def latest(self) -> tuple[float, float]:
        """(SM clock MHz, board power W over the last period; NaN before a second read)."""
        with self._lock:
            return self._last[1], self._power

    def energy_mj(self) -> float:
        """The energy counter at the last read."""
        with self._lock:
            return self._last[2]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2.0)

    def __enter__(self) -> NvmlSampler:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
