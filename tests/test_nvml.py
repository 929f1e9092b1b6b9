"""The NVML backend, and the GPU lab's reads built on it: for real where this machine allows
(no driver here), the rest through the narrow `NvmlLib` seam with a small fake that raises
the real pynvml errors."""

from __future__ import annotations

import ctypes
import math
import time
from types import SimpleNamespace

import pynvml
import pytest
from structlog.testing import capture_logs

from throttllem import (
    ClockOutOfRangeError,
    GpuError,
    GpuNotFoundError,
    GpuNotSupportedError,
    GpuPermissionError,
)
from throttllem._gpu.backend import GpuBackend
from throttllem._gpu.nvml import NvmlBackend, NvmlLib, probe
from throttllem._gpulab.sampler import (
    NvmlSampler,
    describe_gpu,
    nvml_index_of_cuda_device,
    open_nvml,
)
from throttllem.testing import FakeNvml


def _driver_present() -> bool:
    try:
        ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        return False
    return True


no_driver = pytest.mark.skipif(_driver_present(), reason="an NVIDIA driver is installed here")


def backend(fake: NvmlLib, *, dry_run: bool = False) -> NvmlBackend:
    return NvmlBackend(dry_run=dry_run, lib=fake)


# --------------------------------------------------------------------------- for real


@no_driver
def test_real_pynvml_without_a_driver_says_to_use_the_twin() -> None:
    with pytest.raises(GpuNotFoundError) as info:
        NvmlBackend()

    message = str(info.value)
    assert message.startswith("nvmlInit failed")
    assert "no NVIDIA driver: use the twin backend with --gpu twin" in message
    assert "NVML_ERROR_LIBRARY_NOT_FOUND" in message
    assert isinstance(info.value, LookupError)
    cause = info.value.__cause__
    assert isinstance(cause, pynvml.NVMLError)
    assert cause.value == pynvml.NVML_ERROR_LIBRARY_NOT_FOUND


@no_driver
def test_real_probe_without_a_driver_fails_the_same_way() -> None:
    with pytest.raises(GpuNotFoundError, match="--gpu twin"):
        probe()


# --------------------------------------------------------------------------- reads


def test_read_converts_units_and_decodes_names() -> None:
    fake = FakeNvml()

    with backend(fake) as gpu:
        reading = gpu.read(0)

    assert isinstance(gpu, GpuBackend)
    assert gpu.name == "nvml"
    assert reading.power_w == 250.5  # NVML reports milliwatts
    assert reading.energy_mj == 123_456_789.0
    assert (reading.sm_clock_mhz, reading.mem_clock_mhz) == (1980.0, 2619.0)
    assert (reading.gpu_util_pct, reading.mem_util_pct) == (87.0, 41.0)
    assert reading.temperature_c == 54.0
    assert reading.name == "NVIDIA H100 80GB HBM3"
    assert reading.uuid.startswith("GPU-")
    assert fake.called("nvmlDeviceGetTemperature")[0][2] == pynvml.NVML_TEMPERATURE_GPU


def test_counters_a_gpu_lacks_read_as_zero_but_required_ones_raise() -> None:
    fake = FakeNvml(
        fail={
            "nvmlDeviceGetUtilizationRates": pynvml.NVML_ERROR_NOT_SUPPORTED,
            "nvmlDeviceGetTemperature": pynvml.NVML_ERROR_NOT_SUPPORTED,
        }
    )
    gpu = backend(fake)

    reading = gpu.read(0)
    assert (reading.gpu_util_pct, reading.temperature_c) == (0.0, 0.0)

    fake.fail["nvmlDeviceGetTotalEnergyConsumption"] = pynvml.NVML_ERROR_NOT_SUPPORTED
    with pytest.raises(GpuNotSupportedError, match="nvmlDeviceGetTotalEnergyConsumption failed"):
        gpu.read(0)


def test_supported_clocks_are_ascending_at_the_top_memory_clock_and_cached() -> None:
    fake = FakeNvml()
    gpu = backend(fake)

    clocks = gpu.supported_clocks_mhz(0)

    assert clocks == tuple(range(345, 1981, 15))
    assert len(clocks) == 110
    assert gpu.supported_clocks_mhz(0) is clocks
    [graphics_call] = fake.called("nvmlDeviceGetSupportedGraphicsClocks")
    assert graphics_call[2] == 2619


def test_an_index_past_the_gpus_is_not_found() -> None:
    gpu = backend(FakeNvml(count=2))

    with pytest.raises(GpuNotFoundError, match=r"no GPU at NVML index 2: NVML sees 2 GPU\(s\)"):
        gpu.read(2)


# --------------------------------------------------------------------------- writes


def test_clock_targets_are_validated_against_supported_clocks() -> None:
    fake = FakeNvml(allow_set=True)
    gpu = backend(fake)

    with pytest.raises(ClockOutOfRangeError) as info:
        gpu.set_locked_clocks(0, 1000, 1000)
    message = str(info.value)
    assert "1000 MHz is not a supported SM clock of GPU 0" in message
    assert "345–1980 MHz in 15 MHz steps" in message
    assert "nearest: 990 or 1005 MHz" in message
    assert fake.called("nvmlDeviceSetGpuLockedClocks") == []

    gpu.set_locked_clocks(0, 1005, 1005)
    assert fake.called("nvmlDeviceSetGpuLockedClocks") == [
        ("nvmlDeviceSetGpuLockedClocks", "handle-0", 1005, 1005)
    ]


@pytest.mark.parametrize(
    ("low", "high", "message"),
    [
        (2000, 2000, "nearest: 1980 MHz"),
        (300, 300, "nearest: 345 MHz"),
        (1500, 1200, "min_mhz 1500 is above max_mhz 1200"),
        (1200.5, 1200.5, "whole MHz"),
    ],
)
def test_other_invalid_clock_targets(low: int, high: int, message: str) -> None:
    with pytest.raises(ClockOutOfRangeError, match=message):
        backend(FakeNvml(allow_set=True)).set_locked_clocks(0, low, high)


def test_permission_denied_says_what_to_do() -> None:
    fake = FakeNvml(fail={"nvmlDeviceSetGpuLockedClocks": pynvml.NVML_ERROR_NO_PERMISSION})

    with pytest.raises(GpuPermissionError) as info:
        backend(fake).set_locked_clocks(0, 1200, 1200)

    message = str(info.value)
    assert message.startswith("nvmlDeviceSetGpuLockedClocks failed on GPU 0")
    assert "root or CAP_SYS_ADMIN" in message
    assert "privileged" in message
    assert "--dry-run" in message
    assert isinstance(info.value, PermissionError)
    assert isinstance(info.value.__cause__, pynvml.NVMLError)
    assert info.value.__cause__.value == pynvml.NVML_ERROR_NO_PERMISSION


@pytest.mark.parametrize(
    ("code", "error", "hint"),
    [
        (pynvml.NVML_ERROR_NOT_SUPPORTED, GpuNotSupportedError, "does not support"),
        (pynvml.NVML_ERROR_DRIVER_NOT_LOADED, GpuNotFoundError, "--gpu twin"),
        (pynvml.NVML_ERROR_LIBRARY_NOT_FOUND, GpuNotFoundError, "--gpu twin"),
        (pynvml.NVML_ERROR_INVALID_ARGUMENT, GpuError, "rejected the arguments"),
        (pynvml.NVML_ERROR_GPU_IS_LOST, GpuError, "fell off the bus"),
        (pynvml.NVML_ERROR_UNKNOWN, GpuError, "NVML_ERROR_UNKNOWN"),
    ],
)
def test_nvml_errors_map_through_one_table(code: int, error: type[GpuError], hint: str) -> None:
    fake = FakeNvml(fail={"nvmlDeviceResetGpuLockedClocks": code})

    with pytest.raises(error, match=hint) as info:
        backend(fake).reset_locked_clocks(0)

    assert isinstance(info.value.__cause__, pynvml.NVMLError)
    if error is GpuError:  # the generic codes must not pose as a more specific error
        assert type(info.value) is GpuError


def test_driver_not_loaded_at_init() -> None:
    fake = FakeNvml(fail={"nvmlInit": pynvml.NVML_ERROR_DRIVER_NOT_LOADED})

    with pytest.raises(GpuNotFoundError, match="kernel driver is not running; no NVIDIA driver"):
        NvmlBackend(lib=fake)


# --------------------------------------------------------------------------- dry-run


def test_dry_run_reads_for_real_records_exact_calls_and_never_sets() -> None:
    fake = FakeNvml(allow_set=False)  # a setter call would raise AssertionError
    gpu = backend(fake, dry_run=True)

    with capture_logs() as logs:
        gpu.set_locked_clocks(0, 1200, 1200)
        gpu.reset_locked_clocks(0)
    reading = gpu.read(0)

    assert gpu.dry_run_calls == [
        "nvmlDeviceSetGpuLockedClocks(handle=<index 0>, minGpuClockMHz=1200, maxGpuClockMHz=1200)",
        "nvmlDeviceResetGpuLockedClocks(handle=<index 0>)",
    ]
    assert [(e["event"], e["call"], e["gpu_index"]) for e in logs] == [
        ("nvml.dry_run", gpu.dry_run_calls[0], 0),
        ("nvml.dry_run", gpu.dry_run_calls[1], 0),
    ]
    assert fake.called("nvmlDeviceSetGpuLockedClocks") == []
    assert fake.called("nvmlDeviceResetGpuLockedClocks") == []
    assert reading.power_w == 250.5


def test_dry_run_still_validates() -> None:
    gpu = backend(FakeNvml(), dry_run=True)

    with pytest.raises(ClockOutOfRangeError, match="nearest: 990 or 1005 MHz"):
        gpu.set_locked_clocks(0, 1000, 1000)
    assert gpu.dry_run_calls == []


# --------------------------------------------------------------------------- lifecycle


def test_close_shuts_nvml_down_once_and_never_resets_clocks() -> None:
    fake = FakeNvml(allow_set=True)

    with backend(fake) as gpu:
        gpu.set_locked_clocks(0, 1200, 1200)
    gpu.close()

    assert len(fake.called("nvmlInit")) == 1
    assert len(fake.called("nvmlShutdown")) == 1
    assert fake.called("nvmlDeviceResetGpuLockedClocks") == []
    with pytest.raises(GpuError, match="closed"):
        gpu.read(0)
    with pytest.raises(GpuError, match="closed"):
        gpu.supported_clocks_mhz(0)


def test_each_backend_owns_its_nvml_session() -> None:
    fake = FakeNvml()

    first, second = backend(fake), backend(fake)
    first.close()

    assert second.read(0).power_w == 250.5
    assert len(fake.called("nvmlInit")) == 2


# --------------------------------------------------------------------------- probe


def test_probe_reads_everything_once_and_only_dry_runs() -> None:
    fake = FakeNvml(allow_set=False)

    result = probe(0, dry_run_clock_mhz=1410, lib=fake)

    assert result["power_w"] == 250.5
    assert result["sm_clock_mhz"] == 1980.0
    assert result["driver_version"] == "570.86.15"
    assert result["gpu_count"] == 1
    assert result["supported_clocks_mhz"] == {
        "count": 110,
        "min": 345,
        "max": 1980,
        "described": "345–1980 MHz in 15 MHz steps",
    }
    assert "power.draw,clocks.sm,clocks.mem,utilization.gpu,temperature.gpu" in str(
        result["nvidia_smi_query"]
    )
    assert result["dry_run_calls"] == [
        "nvmlDeviceSetGpuLockedClocks(handle=<index 0>, minGpuClockMHz=1410, maxGpuClockMHz=1410)",
        "nvmlDeviceResetGpuLockedClocks(handle=<index 0>)",
    ]
    assert len(fake.called("nvmlShutdown")) == 1


# --------------------------------------------------------------------------- single counters


def test_single_counter_reads_match_a_full_read() -> None:
    gpu = backend(FakeNvml())

    reading = gpu.read(0)

    assert gpu.energy_mj(0) == reading.energy_mj
    assert gpu.sm_clock_mhz(0) == reading.sm_clock_mhz
    assert gpu.power_limit_w(0) == 700.0  # NVML reports milliwatts


def test_single_counter_reads_go_through_the_error_table() -> None:
    fake = FakeNvml(fail={"nvmlDeviceGetTotalEnergyConsumption": pynvml.NVML_ERROR_NOT_SUPPORTED,
                          "nvmlDeviceGetEnforcedPowerLimit": pynvml.NVML_ERROR_NOT_SUPPORTED})
    gpu = backend(fake)

    with pytest.raises(GpuNotSupportedError, match="nvmlDeviceGetTotalEnergyConsumption failed"):
        gpu.energy_mj(0)
    assert gpu.power_limit_w(0) is None  # optional: metadata only
    fake.fail["nvmlDeviceGetClockInfo"] = pynvml.NVML_ERROR_GPU_IS_LOST
    with pytest.raises(GpuError, match="fell off the bus"):
        gpu.sm_clock_mhz(0)
    with pytest.raises(GpuNotFoundError, match="no GPU at NVML index 3"):
        gpu.energy_mj(3)


def test_index_of_uuid_ignores_prefix_and_case() -> None:
    gpu = backend(FakeNvml(count=3))
    third = gpu.read(2).uuid

    assert gpu.index_of_uuid(third) == 2
    assert gpu.index_of_uuid(third.removeprefix("GPU-").upper()) == 2
    with pytest.raises(GpuNotFoundError, match="no GPU with UUID 'GPU-nope'"):
        gpu.index_of_uuid("GPU-nope")


def test_probe_records_the_power_limit() -> None:
    assert probe(0, lib=FakeNvml())["power_limit_w"] == 700.0
    fake = FakeNvml(fail={"nvmlDeviceGetEnforcedPowerLimit": pynvml.NVML_ERROR_NOT_SUPPORTED})
    assert probe(0, lib=fake)["power_limit_w"] is None


# --------------------------------------------------------------------------- the GPU lab's reads


class CountingNvml(FakeNvml):
    """A GPU drawing power: its energy counter advances by 1 J at every read."""

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: object, /) -> int:
        self.energy_mj += 1000
        return super().nvmlDeviceGetTotalEnergyConsumption(handle)


def test_lab_nvml_is_read_only_and_fails_clearly_without_a_driver() -> None:
    fake = FakeNvml()
    gpu = open_nvml(lib=fake)
    assert gpu.dry_run
    gpu.set_locked_clocks(0, 1410, 1410)  # recorded, never called
    assert fake.called("nvmlDeviceSetGpuLockedClocks") == []
    with pytest.raises(GpuNotFoundError, match="kernel driver is not running"):
        open_nvml(lib=FakeNvml(fail={"nvmlInit": pynvml.NVML_ERROR_DRIVER_NOT_LOADED}))


@no_driver
def test_lab_describe_records_a_missing_driver_rather_than_raising() -> None:
    info = describe_gpu(0)
    assert "--gpu twin" in str(info["describe_error"])


def test_lab_describe_is_the_probe() -> None:
    assert describe_gpu(0, lib=FakeNvml())["power_limit_w"] == 700.0


def test_cuda_device_maps_to_its_nvml_index_by_uuid() -> None:
    gpu = backend(FakeNvml(count=4))
    uuids = {d: gpu.read(3 - d).uuid for d in range(4)}  # CUDA order reversed from PCI order

    def properties(device: int) -> SimpleNamespace:
        return SimpleNamespace(uuid=uuids[device].removeprefix("GPU-"))

    torch = SimpleNamespace(cuda=SimpleNamespace(get_device_properties=properties))
    assert [nvml_index_of_cuda_device(gpu, torch, d) for d in range(4)] == [3, 2, 1, 0]
    uuids[1] = "GPU-elsewhere"
    assert nvml_index_of_cuda_device(gpu, torch, 1) == 1  # not found: the CUDA index


def test_sampler_reads_clock_and_energy_in_its_thread() -> None:
    fake = CountingNvml()
    with NvmlSampler(backend(fake), 0, period_s=0.001) as sampler:
        deadline = time.monotonic() + 10.0
        while sampler.reads < 4 and time.monotonic() < deadline:
            time.sleep(0.005)
        clock, power = sampler.latest()
    assert sampler.reads >= 4
    assert clock == 1980.0
    assert set(sampler.clocks_mhz) == {1980.0}
    assert math.isfinite(power)
    assert power > 0
    assert sampler.energy_mj() == fake.energy_mj
    assert sampler.failed_reads == 0


def test_sampler_power_is_the_counter_over_the_period() -> None:
    fake = FakeNvml()
    with NvmlSampler(backend(fake), 0, period_s=3600.0) as sampler:  # the thread stays asleep
        _, before = sampler.latest()
        t0, e0 = 100.0, float(fake.energy_mj)
        sampler.record(t0, 1500.0, e0)
        sampler.record(t0 + 2.0, 1485.0, e0 + 600_000.0)
        clock, power = sampler.latest()
        sampler.record(t0 + 3.0, 1485.0, e0)  # a counter going back keeps the last power
        _, kept = sampler.latest()
    assert math.isnan(before)
    assert (clock, power, kept) == (1485.0, 300.0, 300.0)
    assert sampler.clocks_mhz[-3:] == [1500.0, 1485.0, 1485.0]


def test_sampler_fails_at_start_and_skips_later_failed_reads() -> None:
    no_energy = FakeNvml(fail={"nvmlDeviceGetTotalEnergyConsumption":
                               pynvml.NVML_ERROR_NOT_SUPPORTED})
    with pytest.raises(GpuNotSupportedError):
        NvmlSampler(backend(no_energy), 0)
    fake = FakeNvml()
    with NvmlSampler(backend(fake), 0, period_s=0.001) as sampler:
        fake.fail["nvmlDeviceGetClockInfo"] = pynvml.NVML_ERROR_GPU_IS_LOST
        deadline = time.monotonic() + 10.0
        while sampler.failed_reads < 2 and time.monotonic() < deadline:
            time.sleep(0.005)
    assert sampler.failed_reads >= 2
    assert sampler.latest()[0] == 1980.0  # the last good read stays
