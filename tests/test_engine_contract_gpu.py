"""The engine contract suite run for the GPU engine (`throttllem run engine --backend gpu`)
on a CPU, as processes on a real nats-server: once with the fake pass timer (passes sleep a
function of their shape) and once with the torch runner's tiny decoder really running every
pass (skipped without torch). Plus the energy arithmetic of a measured run (a counter
timeline charged per pass, attributed by token share), and the guarantee that a run that
measures nothing says so and publishes no energy."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest

from throttllem._bus import EmbeddedNatsServer
from throttllem._core.energy import EnergyLedger
from throttllem._engines import check_backend
from throttllem._engines.contract import ENGINE_SERVICE
from throttllem._engines.gpu import (
    ENERGY_MEASURED,
    ENERGY_NOT_MEASURED,
    GpuEngineOptions,
    _LiveLoopGpu,
    fake_pass_ms,
)
from throttllem._errors import ConfigError
from throttllem._events import RequestArrived
from throttllem._gpu.nvml import NvmlBackend
from throttllem._gpulab.loop import FakePassRunner
from throttllem._gpulab.sampler import CounterTimeline, NvmlSampler, PassEnergyMeter
from throttllem._runtime import Clock
from throttllem._setup import DEFAULT_SETUP, load_setup
from throttllem._subjects import health
from throttllem._twin.engine import EngineTwin
from throttllem._twin.profile import load_profile
from throttllem.testing import FakeNvml
from throttllem.testing_engine_contract import EngineContractSuite, EngineProcess

HAS_TORCH = importlib.util.find_spec("torch") is not None


def engine_argv(nats: EmbeddedNatsServer, clock: Clock, record: Path, *runner: str,
                device: str = "cpu") -> list[str]:
    return [sys.executable, "-m", "throttllem", "run", "engine", "--backend", "gpu",
            "--instance", "i0", "--setup", DEFAULT_SETUP, "--nats", nats.url,
            "--epoch-wall", repr(clock.epoch_wall_s), "--device", device, "--record",
            str(record), *runner]


def _has_cuda() -> bool:
    if not HAS_TORCH:
        return False
    import torch  # noqa: PLC0415 - only where torch is installed

    return bool(torch.cuda.is_available())


def read_records(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


class TestGpuEngineContractFakeTimer(EngineContractSuite):
    # Admissions are acked once done (the engine shell): a restarted engine serves them.
    accepted_requests_survive_a_crash = True
    runner: ClassVar[tuple[str, ...]] = ("--runner", "fake")
    device: ClassVar[str] = "cpu"

    @pytest.fixture
    def engine(self, nats: EmbeddedNatsServer, tmp_path: Path) -> Iterator[EngineProcess]:
        clock = Clock(epoch_wall_s=time.time())
        argv = engine_argv(nats, clock, tmp_path / "engine.jsonl", *self.runner,
                           device=self.device)
        with EngineProcess(argv, instance="i0", clock=clock, setup=load_setup(DEFAULT_SETUP),
                           health_subject=health(ENGINE_SERVICE),
                           log_path=tmp_path / "engine.log") as engine:
            yield engine

    async def test_a_run_that_measures_nothing_says_so_and_publishes_no_energy(
            self, nats: EmbeddedNatsServer, engine: EngineProcess, tmp_path: Path) -> None:
        async with self.watching(nats, engine) as watch:
            for n, (p, o) in enumerate([(30, 5), (200, 12)]):
                await watch.admit(self.request(engine, f"e{n}", prompt_tokens=p,
                                               output_tokens=o))
            await watch.wait_completed("e0", "e1")
            for rid in ("e0", "e1"):
                await watch.wait_accounted(watch.completed[rid])
            await watch.wait_for("a heartbeat", lambda: bool(watch.heartbeats))

        assert all(c.energy_mj is None for c in watch.completed.values())
        assert all(it.energy_mj == 0.0 and it.power_w == 0.0 and it.clock_mhz == 0.0
                   for it in watch.iterations)
        assert watch.heartbeats[-1].metrics["energy_measured"] == 0.0
        records = read_records(tmp_path / "engine.jsonl")
        head = records[0]
        assert head["kind"] == "engine"
        assert head["energy_source"] == ENERGY_NOT_MEASURED
        passes = [r for r in records if r["kind"] == "pass"]
        done = [r for r in records if r["kind"] == "request"]
        assert [r["seq"] for r in passes] == [it.seq for it in watch.iterations]
        assert all(r["energy_source"] == ENERGY_NOT_MEASURED for r in passes + done)
        assert sorted(str(r["id"]) for r in done) == ["e0", "e1"]
        assert all(r["energy_mj"] is None for r in done)
        # A pass's event lasts what the pass took on the clock: at least the runner's time.
        for r, it in zip(passes, watch.iterations, strict=True):
            assert it.duration_ms == r["duration_ms"]
            assert it.duration_ms >= float(str(r["gpu_ms"])) * 0.999


@pytest.mark.skipif(not HAS_TORCH, reason="the torch runner needs PyTorch (pip install torch)")
class TestGpuEngineContractTorchCpu(TestGpuEngineContractFakeTimer):
    """Every pass really runs the decoder (2 layers, tiny) on the CPU."""

    runner: ClassVar[tuple[str, ...]] = ("--runner", "torch", "--model", "tiny")
    # A tiny decoder's passes are fast: a longer request still outlasts an abort.
    long_output_tokens: ClassVar[int] = 6000
    # Its passes are slower than the fake timer's on a busy CPU: served again in time.
    crash_output_tokens: ClassVar[int] = 1000


@pytest.mark.skipif(not _has_cuda(), reason="runs on a CUDA GPU (the lent GPU machine)")
class TestGpuEngineContractCuda(TestGpuEngineContractFakeTimer):
    """On a CUDA GPU: the full Llama-3-8B-shaped decoder, every pass on the card, energy from
    the card's NVML counter (read only; the engine never sets a clock)."""

    runner: ClassVar[tuple[str, ...]] = ("--runner", "torch")
    device: ClassVar[str] = "cuda:0"
    # Decode passes of a full-size decoder take milliseconds: a long request outlasts an abort.
    long_output_tokens: ClassVar[int] = 6000
    # On a GPU energy is measured: the CPU variants' "measures nothing" check does not apply.
    test_a_run_that_measures_nothing_says_so_and_publishes_no_energy = None  # type: ignore[assignment]

    async def test_a_run_on_a_gpu_measures_the_energy_of_every_request(
            self, nats: EmbeddedNatsServer, engine: EngineProcess, tmp_path: Path) -> None:
        async with self.watching(nats, engine) as watch:
            for n, (p, o) in enumerate([(300, 40), (2000, 80)]):
                await watch.admit(self.request(engine, f"e{n}", prompt_tokens=p,
                                               output_tokens=o))
            await watch.wait_completed("e0", "e1")
            await watch.wait_for("a heartbeat", lambda: bool(watch.heartbeats))

        assert all(c.energy_mj is not None and c.energy_mj > 0
                   for c in watch.completed.values())
        assert all(it.energy_mj >= 0.0 and it.clock_mhz > 0.0 for it in watch.iterations)
        assert sum(it.energy_mj for it in watch.iterations) > 0.0
        records = read_records(tmp_path / "engine.jsonl")
        assert records[0]["energy_source"] == ENERGY_MEASURED
        done = [r for r in records if r["kind"] == "request"]
        assert sorted(str(r["id"]) for r in done) == ["e0", "e1"]
        # Each request's energy is its token share of its passes: never more than them all.
        total_mj = sum(float(str(r["energy_mj"])) for r in records if r["kind"] == "pass")
        assert 0 < sum(float(str(r["energy_mj"])) for r in done) <= total_mj * 1.000001


# --------------------------------------------------------------------------- energy


def test_counter_timeline_interpolates_extrapolates_and_restarts() -> None:
    t = CounterTimeline(keep=4)
    assert np.isnan(t.at(1.0))
    t.add(10.0, 1000.0)
    assert t.at(5.0) == t.at(12.0) == 1000.0
    t.add(11.0, 1300.0)
    assert t.at(10.5) == pytest.approx(1150.0)
    assert t.at(11.5) == pytest.approx(1450.0)  # the last period's rate, past the last read
    t.add(11.0, 1400.0)  # a duplicate instant keeps the first read
    assert t.at(11.0) == 1300.0
    for k in range(5):
        t.add(12.0 + k, 1400.0 + 100.0 * k)
    assert len(t) == 4
    t.add(20.0, 5.0)  # the counter went back (driver reloaded): start over
    assert len(t) == 1
    assert t.at(30.0) == 5.0


def test_pass_energy_meter_chains_back_to_back_passes_and_skips_idle() -> None:
    power_mw = 300_000.0  # 300 W, in mJ per second

    def counter(t: float) -> float:
        return 7e6 + power_mw * t

    meter = PassEnergyMeter(counter)
    charges = [meter.charge(0.0, 0.010), meter.charge(0.011, 0.020), meter.charge(0.022, 0.05)]
    # back to back: the host gaps between passes are charged too; sum = the busy period's
    assert sum(charges) == pytest.approx(power_mw * 0.05)
    meter.break_chain()  # idle from 0.05 to 1.0: charged to no pass
    assert meter.charge(1.0, 1.01) == pytest.approx(power_mw * 0.01)
    assert meter.charge(1.01, 1.005) == 0.0  # never negative


def test_the_nvml_sampler_answers_the_counter_at_any_instant() -> None:
    """The sampler the engine charges passes from, on the NVML backend (read-only) over a
    stand-in NVML library; its thread is kept asleep and the reads are fed by hand."""
    fake = FakeNvml(energy_mj=5_000_000)
    with NvmlSampler(NvmlBackend(dry_run=True, lib=fake), 0, period_s=3600.0,
                     keep_clocks=False) as sampler:
        t0 = time.perf_counter()
        sampler.record(t0 + 1.0, 1980.0, 5_000_000 + 400_000)  # 400 W over a second
        sampler.record(t0 + 2.0, 1965.0, 5_000_000 + 700_000)
        assert sampler.energy_at(t0 + 1.5) == pytest.approx(5_550_000)
        assert sampler.energy_at(t0 + 2.5) == pytest.approx(5_850_000)
        meter = PassEnergyMeter(sampler.energy_at)
        assert meter.charge(t0 + 1.0, t0 + 1.25) == pytest.approx(75_000)
        assert sampler.latest() == (1965.0, pytest.approx(300.0))
        assert sampler.clocks_mhz == [1980.0]  # only the first read: memory stays flat
    assert fake.called("nvmlDeviceSetGpuLockedClocks") == []


def test_measured_passes_are_attributed_by_token_share_and_add_up() -> None:
    """A live loop on a synthetic energy counter: every pass is charged what the counter rose
    over it, and the ledger's per-request totals add up to the passes' energy."""
    profile = load_profile(DEFAULT_SETUP)
    runner = FakePassRunner(fake_pass_ms, kv_capacity_tokens=600_000, pace=True)
    start = time.perf_counter()
    meter = PassEnergyMeter(lambda t: 1e6 + 250_000.0 * (t - start))  # 250 W
    clock = Clock(epoch_wall_s=time.time())
    gpu = _LiveLoopGpu(profile, runner, clock, meter, lambda: 1755.0)
    engine = EngineTwin(profile, "i0", gpu)
    gpu.attach(engine)
    now = clock.now_s()
    for n, (p, o) in enumerate([(40, 3), (700, 5), (5, 4)]):
        engine.admit(RequestArrived(id=f"q{n}", arrival_s=now, prompt_tokens=p,
                                    true_output_tokens=o), now)
    ledger = EnergyLedger()
    energy = 0.0
    done: dict[str, float] = {}
    while engine.has_work():
        gpu.before_step()
        out = engine.step(clock.now_s())
        assert out is not None
        it = out.iteration
        assert it.clock_mhz == 1755.0
        assert it.energy_mj > 0
        assert it.duration_ms >= fake_pass_ms(it.decode_tokens, 0, it.prefill_tokens, 0) * 0.9
        energy += it.energy_mj
        ledger.add_iteration(it.request_ids, it.request_tokens, it.energy_mj)
        for c in out.completed:
            done[c.id] = ledger.pop(c.id)
            gpu.release([c.id])
    assert sorted(done) == ["q0", "q1", "q2"]
    assert sum(done.values()) == pytest.approx(energy)
    assert done["q1"] > done["q0"] > 0  # the long prompt's prefill dominates its share
    busy_s = time.perf_counter() - start
    assert energy <= 250_000.0 * busy_s


# --------------------------------------------------------------------------- options


def test_gpu_backend_runs_inside_the_engine_command() -> None:
    assert check_backend("gpu") == "gpu"


@pytest.mark.parametrize(("options", "message"), [
    (GpuEngineOptions(runner="fake", device="cpu", energy="nvml"), "torch runner on a CUDA"),
    (GpuEngineOptions(runner="torch", device="cpu"), "needs a GPU"),
    (GpuEngineOptions(device="tpu"), "--device"),
    (GpuEngineOptions(runner="fast"), "--runner"),
    (GpuEngineOptions(kv_tokens=0), "--kv-tokens"),
])
def test_options_that_cannot_work_are_refused(options: GpuEngineOptions, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        options.check()


def test_the_command_refuses_to_measure_what_it_does_not_run(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "throttllem", "run", "engine", "--backend", "gpu",
         "--instance", "i0", "--device", "cpu", "--runner", "fake", "--energy", "nvml"],
        capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode != 0
    assert "--energy nvml needs the torch runner on a CUDA device" in result.stderr


def test_not_measured_is_the_default_off_a_gpu() -> None:
    assert not GpuEngineOptions(runner="fake", device="cpu").energy_measured
    assert not GpuEngineOptions(runner="torch", device="cpu", model="tiny").energy_measured
    assert GpuEngineOptions(runner="torch", device="cuda:0").energy_measured


# --------------------------------------------------------------------------- the device script


@pytest.mark.slow
def test_the_device_demo_script_runs_both_engines_and_labels_what_it_measured(
        tmp_path: Path) -> None:
    """`benchmarks/device_demo_gpu.py` end to end off a GPU (`--cpu-smoke`: the fake pass
    timer, no NVML): the GPU engine's run is labelled not measured and carries no energy; the
    twin's is labelled simulated; the comparison has a ratio for every latency figure."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "device_demo_gpu.py"
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, str(script), "--cpu-smoke", "--minutes", "0.1", "--out", str(out)],
        capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    doc = json.loads((out / "demo_gpu.json").read_text(encoding="utf-8"))
    hw, twin = doc["hardware"], doc["twin"]
    assert doc["gpu"] is None
    assert not hw["measured"]
    assert hw["energy_j"] is None
    assert hw["attributed_energy_j"] is None
    assert "not measured" in hw["energy_source"]
    assert hw["engine"]["energy_source"] == ENERGY_NOT_MEASURED
    assert twin["energy_source"] == "twin (simulated)"
    assert twin["energy_j"] > 0
    assert sum(twin["energy_records"].values()) == twin["requests_served"]
    for run in (hw, twin):
        assert run["requests_served"] == run["requests_submitted"] > 0
    assert hw["passes"] > 0
    ratios = doc["twin_over_hardware"]
    assert ratios["energy_j"] is None
    assert all(ratios[k] is not None and ratios[k] > 0 for k in (
        "ttft_p50_ms", "tbt_p50_ms", "e2e_p50_ms", "mean_batch"))
    assert "not measured" in (out / "demo_gpu.txt").read_text(encoding="utf-8")
    assert (out / "logs.tar.gz").stat().st_size > 0
