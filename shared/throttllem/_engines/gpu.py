"""The GPU engine adapter: our decode loop (`throttllem._gpulab`) as one engine instance on
the bus, keeping the engine contract (`throttllem._engines.contract`) as the twin does.

The scheduler is the engine twin's (`EngineTwin`: iteration-level inflight batching, FCFS,
paged-KV accounting, preemption), given a `LoopGpu` whose passes really run on a
`PassRunner`: on a GPU the Llama-3-8B-shaped random-weight decoder of `_gpulab.passes`
(FlashAttention-2 varlen, CUDA graphs); on a CPU the same runner with a tiny decoder, or a
pass timer that sleeps a function of the pass shape (`--runner fake`, for tests). A random-
weight model has no end-of-sequence, so a request decodes to the trace's true length
(`true_output_tokens`), else to min(max_tokens, 128) tokens, as the twin does.

Time: a pass starts at the shared clock's now and ends when it really ended (its duration is
what it took, host work included); latencies in `request.completed` are event time read off
those pass ends.

Energy: where the runner is the torch decoder on a CUDA device, an NVML sampler thread reads
the card's energy counter and each pass is charged the counter's increase over it
(`_gpulab.sampler.PassEnergyMeter`; passes run back to back share boundaries, so their
charges add up to the counter's increase over the busy period); `request.completed` carries
each request's token share of every pass it took part in (`_core.energy.EnergyLedger`), and
the engine's records say `energy_source="nvml"`. Anywhere else nothing is measured: passes
carry 0 mJ and 0 MHz, completions no energy (`energy_mj=None`), and the records say
`energy_source="not-measured"`; a fake timer's figures are never published as energy.

The engine never sets a clock, power limit or any other GPU setting: NVML is opened
read-only (dry-run) and only read.

A pass runs in a worker thread, so the bus keeps being served while the GPU works; the
engine's state changes only in the serving loop, between passes, as in the twin.
"""

from __future__ import annotations

import importlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Final

import anyio
import anyio.abc
import anyio.to_thread
import msgspec
import structlog

from throttllem._bus import Bus
from throttllem._core.energy import EnergyLedger
from throttllem._engines.contract import ENGINE_SERVICE, EngineAdapter
from throttllem._engines.shell import EngineShell
from throttllem._errors import ConfigError, GpuError
from throttllem._events import EngineIteration, RequestCompleted
from throttllem._gpulab.decoder import LLAMA3_8B, DecoderShape
from throttllem._gpulab.loop import (
    FakePassRunner,
    LoopGpu,
    PassMeasurement,
    PassRunner,
)
from throttllem._gpulab.sampler import PassEnergyMeter
from throttllem._runtime import Clock
from throttllem._setup import DEFAULT_SETUP
from throttllem._subjects import token
from throttllem._twin.engine import EngineTwin, IterationOutcome
from throttllem._twin.profile import SetupProfile, load_profile

log = structlog.get_logger("throttllem.engine")

# What the records say about energy: read off the GPU's counter, or not measured at all.
ENERGY_MEASURED: Final = "nvml"
ENERGY_NOT_MEASURED: Final = "not-measured"
RUNNERS: Final = ("torch", "fake")
ENERGY_CHOICES: Final = ("auto", "nvml", "none")
# Decoder shapes `--model` names: the full one, and a tiny one for CPU tests.
MODELS: Final[dict[str, DecoderShape]] = {
    "llama3-8b": LLAMA3_8B,
    "tiny": DecoderShape(layers=2, hidden=64, heads=4, kv_heads=2, head_dim=16, ffn=128,
                         vocab=256),
}
# GPU memory kept free beside the weights and the KV cache (activations, CUDA graphs).
_GPU_MARGIN_BYTES: Final = 12 * 2**30


def _no_clock() -> float:
    return 0.0


def fake_pass_ms(batch: int, kv_tokens: int, prefill_tokens: int, attn_tokens2: int) -> float:
    """The fake pass timer: an affine function of the pass shape, in the range of a
    Llama-3-8B pass on an H100 (a stand-in for tests, never a measurement)."""
    return 6.0 + 0.02 * batch + 3e-5 * kv_tokens + 0.02 * prefill_tokens


@dataclass(frozen=True, slots=True)
class GpuEngineOptions:
    """How the GPU engine runs its passes (`throttllem run engine --backend gpu`)."""

    device: str = "cuda:0"
    runner: str = "torch"
    model: str = "llama3-8b"
    kv_tokens: int | None = None  # the runner's KV capacity; default: what fits
    graphs: bool = True
    energy: str = "auto"
    record: Path | None = None  # JSON lines: the engine, every pass, every completion
    nvml_period_s: float = 0.02
    seed: int = 0

    def check(self) -> None:
        if self.runner not in RUNNERS:
            raise ConfigError(f"--runner must be one of {', '.join(RUNNERS)}, not "
                              f"{self.runner!r}")
        if self.model not in MODELS:
            raise ConfigError(f"--model must be one of {', '.join(MODELS)}, not {self.model!r}")
        if self.energy not in ENERGY_CHOICES:
            raise ConfigError(f"--energy must be one of {', '.join(ENERGY_CHOICES)}, not "
                              f"{self.energy!r}")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ConfigError(f"--device must be cpu or cuda[:N], not {self.device!r}")
        if self.kv_tokens is not None and self.kv_tokens < 1:
            raise ConfigError("--kv-tokens must be at least 1")
        if self.nvml_period_s <= 0:
            raise ConfigError("--nvml-period must be positive")
        if self.energy == "nvml" and not self.measures_a_gpu:
            raise ConfigError("--energy nvml needs the torch runner on a CUDA device: the "
                              "energy counter measures only the card the passes run on")
        if self.runner == "torch" and self.device == "cpu" and self.model == "llama3-8b":
            raise ConfigError("the llama3-8b decoder needs a GPU (16 GB of weights); on a CPU "
                              "use --model tiny or --runner fake")

    @property
    def measures_a_gpu(self) -> bool:
        return self.runner == "torch" and self.device.startswith("cuda")

    @property
    def energy_measured(self) -> bool:
        return self.energy == "nvml" or (self.energy == "auto" and self.measures_a_gpu)


class _LiveLoopGpu(LoopGpu):
    """A `LoopGpu` on the shared clock: a pass ends when it really ended, and its energy and
    SM clock are read off NVML (or are 0: not measured)."""

    def __init__(self, profile: SetupProfile, runner: PassRunner, clock: Clock,
                 meter: PassEnergyMeter | None, sm_clock_mhz: Callable[[], float]) -> None:
        super().__init__(profile, runner)
        self.clock = clock
        self.meter = meter
        self._sm_clock_mhz = sm_clock_mhz
        self._step_wall = time.perf_counter()

    def before_step(self) -> None:
        self._step_wall = time.perf_counter()
        super().before_step()

    def finish_pass(self, start_s: float, m: PassMeasurement) -> tuple[PassMeasurement, float]:
        end_wall = time.perf_counter()
        duration_s = max(self.clock.now_s() - start_s, 0.0)
        if self.meter is None:
            return m._replace(energy_mj=0.0, clock_mhz=0.0), duration_s
        energy = self.meter.charge(self._step_wall, end_wall)
        clock = float(self._sm_clock_mhz())
        return m._replace(energy_mj=energy, clock_mhz=clock if math.isfinite(clock) else 0.0), \
            duration_s


class _Records:
    """The engine's JSON-lines record (`--record`): what ran, every pass, every completion,
    each energy figure with its source."""

    def __init__(self, path: Path | None) -> None:
        self._file: IO[str] | None = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = path.open("a", encoding="utf-8")

    def write(self, kind: str, fields: dict[str, Any], *, flush: bool = False) -> None:
        if self._file is None:
            return
        self._file.write(json.dumps({"kind": kind, **fields}, default=str) + "\n")
        if flush:
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class GpuEngineService:
    name = ENGINE_SERVICE

    def __init__(self, *, instance: str, setup: str = DEFAULT_SETUP,
                 options: GpuEngineOptions | None = None) -> None:
        self.options = options or GpuEngineOptions()
        self.options.check()
        self.instance = token(instance)
        self.profile = load_profile(setup)
        self.energy_source = (ENERGY_MEASURED if self.options.energy_measured
                              else ENERGY_NOT_MEASURED)
        self.meta: dict[str, Any] = {}
        self.ledger = EnergyLedger()
        self.shell: EngineShell | None = None  # once built
        self._closers: list[Any] = []
        self.engine: EngineTwin | None = None
        self.gpu: _LiveLoopGpu | None = None

    def health_metrics(self) -> dict[str, float]:
        """Heartbeat metrics: requests in the batch, accepted ones not in it yet, passes, and
        whether energy is measured (1) or not (0)."""
        measured = {"energy_measured": float(self.options.energy_measured)}
        if self.shell is None:
            return measured
        return self.shell.health_metrics() | measured

    # ------------------------------------------------------------------ building the runner

    def _kv_tokens_of_setup(self) -> int:
        e = self.profile.engine
        return e.kv_blocks * e.block_tokens

    def _build(self, clock: Clock) -> None:
        """Build the pass runner, the energy meter and the engine (blocking: loading the
        decoder and capturing CUDA graphs takes a while on a GPU)."""
        o = self.options
        e = self.profile.engine
        token_slots = 4 * e.max_batch + 16  # running ones, and preempted ones between passes
        meter: PassEnergyMeter | None = None
        sm_clock: Callable[[], float] = _no_clock
        meta: dict[str, Any] = {
            "instance": self.instance, "backend": "gpu", "runner": o.runner,
            "device": o.device, "setup": self.profile.name, "energy_source": self.energy_source,
            "clocks": "never changed by this engine (NVML read-only)"}
        runner: PassRunner
        if o.runner == "fake":
            cap = o.kv_tokens or self._kv_tokens_of_setup() + self.profile.model.max_model_len
            runner = FakePassRunner(fake_pass_ms, kv_capacity_tokens=cap,
                                    token_slots=token_slots, pace=True, keep_specs=False)
            meta["pass_times"] = "fake: a function of the pass shape (not measured)"
        else:
            runner, cap = self._torch_runner(token_slots, meta)
        if o.energy_measured:
            meter, sm_clock = self._nvml(meta)
        kv_blocks = min(e.kv_blocks, (cap - 1) // e.block_tokens)
        profile = self.profile
        if kv_blocks < e.kv_blocks:
            profile = profile.with_overrides({"engine.kv_blocks": kv_blocks})
            log.info("engine.kv_clamped", instance=self.instance, setup_kv_blocks=e.kv_blocks,
                     kv_blocks=kv_blocks, runner_kv_tokens=cap)
        meta |= {"kv_capacity_tokens": cap, "kv_blocks": kv_blocks,
                 "setup_kv_blocks": e.kv_blocks}
        self.gpu = _LiveLoopGpu(profile, runner, clock, meter, sm_clock)
        self.engine = EngineTwin(profile, self.instance, self.gpu)
        self.gpu.attach(self.engine)
        self.meta = meta

    def _torch_runner(self, token_slots: int, meta: dict[str, Any]) -> tuple[PassRunner, int]:
        o = self.options
        try:
            torch: Any = importlib.import_module("torch")
        except ImportError as err:
            raise ConfigError("--runner torch needs PyTorch (pip install torch); without it "
                              "use --runner fake") from err
        from throttllem._gpulab.passes import TorchPassRunner  # noqa: PLC0415 - torch only

        shape = MODELS[o.model]
        cap = o.kv_tokens or self._kv_tokens_of_setup() + self.profile.model.max_model_len
        if o.device == "cpu":
            # A toy decoder: one thread, as a shared machine's OpenMP threads spinning
            # against each other slow a pass down by ~40x.
            torch.set_num_threads(1)
        else:
            if not torch.cuda.is_available():
                raise ConfigError(f"--device {o.device}: PyTorch sees no CUDA device")
            dev = torch.device(o.device)
            torch.cuda.set_device(dev)
            free, _ = torch.cuda.mem_get_info(dev)
            fits = int((free - shape.weight_bytes - _GPU_MARGIN_BYTES)
                       // shape.kv_bytes_per_token)
            if o.kv_tokens is None:
                cap = min(cap, fits)
            if cap < self.profile.model.max_model_len:
                raise ConfigError(f"{o.device}: room for {cap} KV tokens only (free "
                                  f"{free / 2**30:.1f} GiB)")
        runner = TorchPassRunner(torch, kv_capacity_tokens=cap, shape=shape, device=o.device,
                                 token_slots=token_slots,
                                 max_ctx=self.profile.model.max_model_len,
                                 graphs=o.graphs, seed=o.seed, nvml=False,
                                 split_decode=o.device.startswith("cuda"))
        meta |= {"model": o.model, "torch": torch.__version__,
                 "attention": runner.attention, "split_decode": runner.split_decode,
                 "graph_buckets": sorted(runner.graphs), "runner_notes": runner.notes,
                 "pass_times": "measured: wall time of each pass (CUDA-synchronized on a GPU)"}
        return _ThreadDevice(runner, torch, o.device), cap

    def _nvml(self, meta: dict[str, Any]) -> tuple[PassEnergyMeter, Callable[[], float]]:
        from throttllem._gpulab.sampler import (  # noqa: PLC0415 - pynvml only when measuring
            NvmlSampler,
            describe_gpu,
            nvml_index_of_cuda_device,
            open_nvml,
        )

        torch: Any = importlib.import_module("torch")
        nvml = open_nvml()  # dry-run: no setter can ever be called
        self._closers.append(nvml.close)
        dev = torch.device(self.options.device)
        index = nvml_index_of_cuda_device(nvml, torch, dev.index or 0)
        sampler = NvmlSampler(nvml, index, self.options.nvml_period_s, keep_clocks=False)
        self._closers.insert(0, sampler.close)
        meta["gpu"] = describe_gpu(index)
        meta["nvml_index"] = index
        meta["energy_method"] = (
            f"NVML total-energy counter read every {self.options.nvml_period_s * 1e3:g} ms in "
            "a thread; each pass charged its increase (interpolated between reads), back-to-"
            "back passes chained; idle time charged to no pass")
        def sm_clock_mhz() -> float:
            return sampler.latest()[0]

        return PassEnergyMeter(sampler.energy_at), sm_clock_mhz

    # ------------------------------------------------------------------ serving

    async def run(self, bus: Bus, clock: Clock, *,
                  task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        if self.options.energy_measured and clock.speed != 1.0:
            raise ConfigError("a GPU engine that measures energy runs in real time: --speed 1")
        records = _Records(self.options.record)
        try:
            await anyio.to_thread.run_sync(self._build, clock)
            records.write("engine", self.meta, flush=True)
            log.info("engine.built", **{k: v for k, v in self.meta.items()
                                        if k not in ("runner_notes", "gpu")},
                     gpu=(self.meta.get("gpu") or {}).get("name"))
            engine, gpu = self._parts()
            self.shell = EngineShell(self.instance, _RealPasses(
                engine, gpu, clock, records, self.ledger,
                energy_measured=self.options.energy_measured, energy_source=self.energy_source))
            await self.shell.run(bus, clock, task_status=task_status, log_fields={
                "setup": self.profile.name, "backend": "gpu", "runner": self.options.runner,
                "device": self.options.device, "energy_source": self.energy_source})
        finally:
            records.close()
            for close in self._closers:
                close()

    def _parts(self) -> tuple[EngineTwin, _LiveLoopGpu]:
        if self.engine is None or self.gpu is None:
            raise RuntimeError("the GPU engine is not built yet")
        return self.engine, self.gpu


class _RealPasses:
    """The GPU engine's `PassDriver`: each pass really runs (in a worker thread, so the bus
    keeps being served) and starts at the clock's now; its energy, where measured, is
    attributed to its requests by token share."""

    simulated_time = False
    lag_wall_s = 0.0

    def __init__(self, engine: EngineTwin, gpu: _LiveLoopGpu, clock: Clock, records: _Records,
                 ledger: EnergyLedger, *, energy_measured: bool, energy_source: str) -> None:
        self.engine = engine
        self.gpu = gpu
        self.clock = clock
        self.records = records
        self.ledger = ledger
        self.energy_measured = energy_measured
        self.energy_source = energy_source

    def _step(self) -> IterationOutcome | None:
        """One pass (in a worker thread): the engine's next pass starting now."""
        self.gpu.before_step()
        return self.engine.step(self.clock.now_s())

    async def run_pass(self, now_s: float) -> IterationOutcome | None:
        try:
            return await anyio.to_thread.run_sync(self._step)
        except MemoryError as e:
            # KV regions are reserved at a request's final length, the engine's blocks at
            # its current one: under heavy load the first can run out first.
            log.error("engine.kv_regions_exhausted", instance=self.engine.instance,
                      error=str(e), running=self.engine.running_count,
                      queued=self.engine.queue_len)
            raise GpuError(f"{self.engine.instance}: the runner's KV cache is out of room "
                           f"({e}); restart with a larger --kv-tokens or fewer concurrent "
                           "requests") from e

    def idle(self, now_s: float) -> None:
        if self.gpu.meter is not None:
            self.gpu.meter.break_chain()  # idle time is charged to no pass

    def passed(self, iteration: EngineIteration) -> None:
        it = iteration
        if self.energy_measured:
            self.ledger.add_iteration(it.request_ids, it.request_tokens, it.energy_mj)
        rec = self.gpu.passes.pop()  # keep memory flat: the record file keeps the passes
        self.gpu.tracker.segments.clear()
        self.records.write("pass", {
            "seq": it.seq, "start_s": it.start_s, "duration_ms": it.duration_ms,
            "gpu_ms": rec.gpu_ms, "wall_ms": rec.wall_ms, "batch": it.batch_size,
            "decode_tokens": it.decode_tokens, "prefill_tokens": it.prefill_tokens,
            "queue_len": it.queue_len, "graphed": rec.graphed, "energy_mj": it.energy_mj,
            "clock_mhz": it.clock_mhz, "energy_source": self.energy_source})

    def completed(self, done: RequestCompleted) -> RequestCompleted:
        """The completion with the energy this engine measured for it (its token share of
        every pass it took part in), or none where nothing is measured."""
        self.gpu.release([done.id])  # its KV region and token slot
        energy = self.ledger.pop(done.id)
        published = msgspec.structs.replace(
            done, energy_mj=energy if self.energy_measured else None)
        self.records.write("request", {
            "id": done.id, "tenant": done.tenant, "prompt_tokens": done.prompt_tokens,
            "generated_tokens": done.generated_tokens, "ttft_ms": done.ttft_ms,
            "tbt_mean_ms": done.tbt_mean_ms, "e2e_ms": done.e2e_ms,
            "completed_s": done.completed_s, "energy_mj": published.energy_mj,
            "energy_source": self.energy_source}, flush=True)
        return published

    def aborted(self, request_id: str) -> None:
        self.gpu.release([request_id])  # its KV region and token slot
        self.ledger.pop(request_id)


class _ThreadDevice:
    """A torch runner whose passes may run in any worker thread: each pass first makes its
    CUDA device the thread's current one (CUDA events record on the current device)."""

    def __init__(self, runner: Any, torch: Any, device: str) -> None:
        self.runner = runner
        self._torch = torch
        self._device = torch.device(device)
        self._cuda = self._device.type == "cuda"
        self.kv_capacity_tokens: int = runner.kv_capacity_tokens
        self.token_slots: int = runner.token_slots

    def run(self, spec: Any) -> PassMeasurement:
        if self._cuda:
            self._torch.cuda.set_device(self._device)
        m: PassMeasurement = self.runner.run(spec)
        return m


_KEEPS_THE_CONTRACT: type[EngineAdapter] = GpuEngineService  # checked by mypy
