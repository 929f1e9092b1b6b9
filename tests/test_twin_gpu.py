"""The GPU twin: NVML-shaped surface, clocks, power cap, energy counter, TP."""

from __future__ import annotations

import pytest

from throttllem._errors import ClockOutOfRangeError, GpuError, GpuNotFoundError
from throttllem._gpu.backend import GpuBackend
from throttllem._twin import clockmodel as cm
from throttllem._twin.gpu import GpuTwin
from throttllem._twin.profile import SetupProfile, load_profile

DECODE = {"batch": 8, "kv_tokens": 8 * 1024, "prefill_tokens": 0}
BIG_PREFILL = {"batch": 0, "kv_tokens": 0, "prefill_tokens": 8192,
               "prefill_attn_tokens2": 4 * 2048.0**2}


@pytest.fixture(scope="module")
def profile() -> SetupProfile:
    return load_profile("h100-llama3-8b-tp1")


def test_implements_the_backend_protocol(profile: SetupProfile) -> None:
    gpu = GpuTwin(profile)
    assert isinstance(gpu, GpuBackend)
    assert gpu.name == "twin"
    assert gpu.gpu_count() == 1
    clocks = gpu.supported_clocks_mhz(0)
    assert clocks == tuple(range(345, 1981, 15))
    r = gpu.read(0)
    assert r.energy_mj == 0.0
    assert r.power_w == profile.gpu.idle_power_w
    assert r.sm_clock_mhz == 345
    assert r.mem_clock_mhz == 2619
    assert "twin" in r.name


def test_locked_clock_validation(profile: SetupProfile) -> None:
    gpu = GpuTwin(profile, switch_latency_s=0.0)
    with pytest.raises(ClockOutOfRangeError, match=r"1000 MHz is not a supported.*345–1980 MHz "
                                                  r"in steps of 15 MHz"):
        gpu.set_locked_clocks(0, 1000, 1000)
    with pytest.raises(ClockOutOfRangeError, match="2000 MHz"):
        gpu.set_locked_clocks(0, 345, 2000)
    with pytest.raises(ClockOutOfRangeError, match="min 1500 MHz > max 990 MHz"):
        gpu.set_locked_clocks(0, 1500, 990)
    with pytest.raises(GpuNotFoundError):
        gpu.set_locked_clocks(1, 990, 990)
    with pytest.raises(GpuNotFoundError):
        gpu.read(-1)
    gpu.set_locked_clocks(0, 990, 1410)
    assert gpu.locked_clocks_mhz(0) == (990, 1410)
    assert gpu.requested_clock_mhz(0) == 1410
    assert gpu.read(0).sm_clock_mhz == 990  # idle at the locked floor
    gpu.reset_locked_clocks(0)
    assert gpu.locked_clocks_mhz(0) is None
    assert gpu.requested_clock_mhz(0) == 1980
    assert gpu.read(0).sm_clock_mhz == 345


def test_energy_counter_integrates_idle_and_busy_power(profile: SetupProfile) -> None:
    gpu = GpuTwin(profile, start_s=100.0)
    gpu.idle_until(110.0)
    idle_mj = profile.gpu.idle_power_w * 10.0 * 1e3
    assert gpu.read(0).energy_mj == pytest.approx(idle_mj)
    gpu.idle_until(105.0)  # the past: no-op
    assert gpu.read(0).energy_mj == pytest.approx(idle_mj)
    res = gpu.run_iteration(112.0, **DECODE)
    expected_t = float(cm.iteration_time_s(profile, clock_mhz=1980, **DECODE))
    expected_p = float(cm.power_w(profile, clock_mhz=1980, **DECODE))
    assert res.duration_s == pytest.approx(expected_t)
    assert res.power_w == pytest.approx(expected_p)
    assert res.clock_mhz == 1980
    assert res.energy_mj == pytest.approx(expected_p * expected_t * 1e3)
    r = gpu.read(0)
    assert r.energy_mj == pytest.approx(idle_mj * 1.2 + res.energy_mj)
    assert r.sm_clock_mhz == 1980
    assert r.power_w == pytest.approx(expected_p)
    assert r.gpu_util_pct == 100.0
    assert 0 < r.mem_util_pct <= 100
    assert gpu.now_s(0) == pytest.approx(112.0 + expected_t)
    with pytest.raises(GpuError, match="busy until"):
        gpu.run_iteration(112.0, **DECODE)


def test_lower_lock_means_longer_iterations_and_less_power(profile: SetupProfile) -> None:
    fast, slow = GpuTwin(profile), GpuTwin(profile, switch_latency_s=0.0)
    slow.set_locked_clocks(0, 990, 990)
    a = fast.run_iteration(0.0, **DECODE)
    b = slow.run_iteration(0.0, **DECODE)
    assert b.clock_mhz == 990
    assert b.duration_s > a.duration_s
    assert b.power_w < a.power_w
    assert b.energy_mj < a.energy_mj  # memory-bound decode: the clock lock saves energy


def test_power_cap_throttles_compute_bound_work(profile: SetupProfile) -> None:
    gpu = GpuTwin(profile, switch_latency_s=0.0)
    res = gpu.run_iteration(0.0, **BIG_PREFILL)
    assert 1400 < res.clock_mhz < 1980
    assert res.power_w <= profile.gpu.power_cap_w
    assert gpu.read(0).sm_clock_mhz == res.clock_mhz
    # A lock below the throttle point is honoured as is.
    gpu.set_locked_clocks(0, 345, 1200)
    assert gpu.run_iteration(gpu.now_s(0), **BIG_PREFILL).clock_mhz == 1200


def test_tensor_parallel_gpus_keep_their_own_counters(profile: SetupProfile) -> None:
    gpu = GpuTwin(profile, count=2, switch_latency_s=0.0)
    assert gpu.gpu_count() == 2
    gpu.set_locked_clocks(1, 990, 990)
    res = gpu.run_iteration(0.0, **DECODE)
    t_fast = float(cm.iteration_time_s(profile, clock_mhz=1980, **DECODE))
    t_slow = float(cm.iteration_time_s(profile, clock_mhz=990, **DECODE))
    assert res.duration_s == pytest.approx(t_slow)  # the pass waits for the slowest GPU
    assert res.clock_mhz == 990
    e0, e1 = gpu.read(0).energy_mj, gpu.read(1).energy_mj
    assert res.energy_mj == pytest.approx(e0 + e1)
    p_fast = float(cm.power_w(profile, clock_mhz=1980, **DECODE))
    assert e0 == pytest.approx((p_fast * t_fast + profile.gpu.idle_power_w
                                * (t_slow - t_fast)) * 1e3)
    assert gpu.read(0).gpu_util_pct < 100.0
    # Only GPU 1 runs the next pass; GPU 0 stays where it was.
    gpu.run_iteration(res.duration_s, indices=[1], **DECODE)
    assert gpu.now_s(1) > gpu.now_s(0)
    assert gpu.read(1).energy_mj > e1
    assert gpu.read(0).energy_mj == e0


def test_a_clock_change_takes_the_switch_latency(profile: SetupProfile) -> None:
    latency = profile.clocking.switch_latency_s
    assert latency > 0
    gpu = GpuTwin(profile)
    gpu.set_locked_clocks(0, 990, 990, at_s=0.0)
    assert gpu.locked_clocks_mhz(0) == (990, 990)  # NVML reports what was asked for
    assert gpu.switch_done_s(0) == pytest.approx(latency)
    early = gpu.run_iteration(0.0, **DECODE)  # started before the switch completes
    assert early.clock_mhz == 1980
    late = gpu.run_iteration(latency + 1.0, **DECODE)
    assert late.clock_mhz == 990
    assert gpu.switch_done_s(0) is None
    # Releasing the lock is a switch too: the lock holds until it completes.
    t = gpu.now_s(0)
    gpu.reset_locked_clocks(0, at_s=t)
    assert gpu.locked_clocks_mhz(0) is None
    assert gpu.run_iteration(t, **DECODE).clock_mhz == 990
    assert gpu.run_iteration(t + latency + 0.5, **DECODE).clock_mhz == 1980


def test_locked_idle_power_depends_on_the_lock(profile: SetupProfile) -> None:
    points = profile.clocking.locked_idle_points
    assert points is not None
    unlocked = GpuTwin(profile, switch_latency_s=0.0)
    locked = GpuTwin(profile, switch_latency_s=0.0)
    high = GpuTwin(profile, switch_latency_s=0.0)
    locked.set_locked_clocks(0, 1080, 1080)
    high.set_locked_clocks(0, 1830, 1830)
    for gpu in (unlocked, locked, high):
        gpu.idle_until(10.0)
    assert unlocked.read(0).power_w == profile.gpu.idle_power_w
    assert locked.read(0).power_w == pytest.approx(dict(points)[1080.0])
    assert high.read(0).power_w == pytest.approx(dict(points)[1830.0])
    # the published figures: a locked idle GPU draws more than an unlocked one, more the
    # higher the lock
    assert unlocked.energy_mj() < locked.energy_mj() < high.energy_mj()
    assert locked.energy_mj() == pytest.approx(dict(points)[1080.0] * 10.0 * 1e3)


def test_idle_energy_switches_power_when_the_switch_completes(profile: SetupProfile) -> None:
    gpu = GpuTwin(profile)
    latency = profile.clocking.switch_latency_s
    gpu.set_locked_clocks(0, 1080, 1080, at_s=0.0)
    gpu.idle_until(10.0)
    points = profile.clocking.locked_idle_points
    assert points is not None
    expected = (profile.gpu.idle_power_w * latency
                + dict(points)[1080.0] * (10.0 - latency)) * 1e3
    assert gpu.energy_mj() == pytest.approx(expected)


def test_flat_idle_profile_keeps_one_idle_power(profile: SetupProfile) -> None:
    flat = profile.with_overrides({"clocking.locked_idle_w": "flat"})
    gpu = GpuTwin(flat, switch_latency_s=0.0)
    gpu.set_locked_clocks(0, 1830, 1830)
    gpu.idle_until(5.0)
    assert gpu.read(0).power_w == profile.gpu.idle_power_w
