# ruff: noqa: N802 -- FakeNvml mirrors NVML's camelCase function names on purpose
"""Testing helpers that ship with the package (as structlog's do): a real nats-server and
log capture. No in-memory fakes of the bus: tests talk to the real server."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import anyio
import numpy as np
import pynvml
from structlog.testing import capture_logs

from throttllem._bus import Bus, EmbeddedNatsServer
from throttllem._core.controller import POLICIES
from throttllem._core.perf import AnyArray, FunctionPerfModel, PerfModel
from throttllem._core.placement import EngineShape, Policy, clock_policy

# The vLLM launcher lives with the adapter (the demo starts vLLM too); re-exported for tests.
from throttllem._engines.vllm.launch import VllmServer, vllm_available, vllm_server
from throttllem._events import (
    ENERGY_CODEC,
    REQUEST_CODEC,
    RequestAdmitted,
    RequestArrived,
    RequestCompleted,
    RequestDeferred,
    RequestEnergy,
    RequestEvent,
)
from throttllem._runtime import Clock, Service
from throttllem._services.replayer import replay
from throttllem._setup import DEFAULT_SETUP
from throttllem._subjects import (
    ENERGY_REQUEST,
    REQUEST_ADMITTED_ALL,
    REQUEST_COMPLETED,
    REQUEST_DEFERRED,
)

if TYPE_CHECKING:
    from throttllem._services.forecaster import ForecasterService

__all__ = [
    "H100_SM_CLOCKS_DESCENDING",
    "AuditedReplay",
    "FakeNvml",
    "RestartableNats",
    "ServiceProcess",
    "VllmServer",
    "audited_replay",
    "capture_logs",
    "crowded_perf",
    "forecaster_service",
    "nats_cluster",
    "nats_server",
    "running_services",
    "setup_policy",
    "vllm_available",
    "vllm_server",
    "watch_decisions",
    "write_test_tokenizer",
]

H100_SM_CLOCKS_DESCENDING = list(range(1980, 344, -15))  # NVML lists them high to low



@contextlib.contextmanager
def nats_server(store_dir: Path | None = None) -> Iterator[EmbeddedNatsServer]:
    """A real nats-server with JetStream on a free loopback port (read from its log)."""
    server = EmbeddedNatsServer(store_dir=store_dir)
    server.start()
    try:
        yield server
    finally:
        server.stop()


class NatsCluster:
    """`size` real nats-servers on loopback routed into one JetStream cluster (each on a free
    client port; route ports picked free just before the start). `url` lists them all, as
    services are given a cluster."""

    def __init__(self, root: Path, size: int = 3) -> None:
        self.root = root
        self.size = size
        self.servers: list[EmbeddedNatsServer] = []

    @property
    def url(self) -> str:
        return ",".join(s.url for s in self.servers)

    def start(self) -> str:
        route_ports = [_free_port() for _ in range(self.size)]
        routes = ", ".join(f'"nats-route://127.0.0.1:{p}"' for p in route_ports)
        for n, port in enumerate(route_ports):
            node = self.root / f"n{n}"
            node.mkdir(parents=True, exist_ok=True)
            conf = node / "cluster.conf"
            conf.write_text(f'server_name: "n{n}"\n'
                            f'cluster {{\n  name: "tllm"\n  listen: "127.0.0.1:{port}"\n'
                            f"  routes: [{routes}]\n}}\n")
            server = EmbeddedNatsServer(store_dir=node / "js", config=conf)
            server.start()
            self.servers.append(server)
        return self.url

    def server_named(self, name: str) -> EmbeddedNatsServer:
        return self.servers[int(name.removeprefix("n"))]

    def stop(self) -> None:
        for server in self.servers:
            server.stop()


def _free_port() -> int:
    import socket  # noqa: PLC0415

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.contextmanager
def nats_cluster(root: Path, size: int = 3) -> Iterator[NatsCluster]:
    """A running `NatsCluster`, stopped on exit."""
    cluster = NatsCluster(root, size)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


class RestartableNats:
    """A nats-server that a test takes away and brings back on the same port and store (a new
    process each time), as an outage or an operator's restart does; clients keep `url`."""

    def __init__(self, store_dir: Path) -> None:
        self.store_dir = store_dir
        self._server = EmbeddedNatsServer(store_dir=store_dir)
        self.url = ""

    @property
    def pid(self) -> int | None:
        return self._server.pid

    def start(self) -> str:
        if self.url:  # again, where the clients point
            port = int(self.url.rsplit(":", 1)[1])
            self._server = EmbeddedNatsServer(store_dir=self.store_dir, port=port)
            self._server.start()
        else:
            self.url = self._server.start()
        return self.url

    def stop(self) -> None:
        self._server.stop()

    async def outage(self, down_s: float) -> None:
        """Gone for `down_s` seconds, then back."""
        self.stop()
        await anyio.sleep(down_s)
        self.start()

    def __enter__(self) -> RestartableNats:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class ServiceProcess:
    """One `throttllem run <args> --nats URL` process that a test kills and starts again; its
    output is appended to `<log_dir>/<name>.log`."""

    def __init__(self, name: str, args: Sequence[str], url: str, log_dir: Path) -> None:
        self.name = name
        self.argv = [sys.executable, "-m", "throttllem", "run", *args, "--nats", url]
        self.log_path = log_dir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=log,
                                         stdin=subprocess.DEVNULL,
                                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.starts += 1

    async def ready(self, timeout_s: float = 60.0) -> None:
        """Return once the latest start logged `service.ready`."""
        with anyio.fail_after(timeout_s):
            while self.log_path.read_text().count("service.ready") < self.starts:
                if self.proc is not None and self.proc.poll() is not None:
                    raise AssertionError(f"{self.name} exited with {self.proc.returncode}: "
                                         f"{self.log_path.read_text()[-3000:]}")
                await anyio.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL: no goodbye, as a crash."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def __enter__(self) -> ServiceProcess:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


@contextlib.asynccontextmanager
async def running_services(url: str, clock: Clock,
                           services: Mapping[str, Service]) -> AsyncIterator[dict[str, Bus]]:
    """Run services in this process, each on its own bus connection (named after it, as its
    own process would be), until the block ends; yields the buses."""
    buses: dict[str, Bus] = {}
    try:
        for name in services:
            buses[name] = await Bus.connect(url, name=name, service=name)
        async with anyio.create_task_group() as tg:
            for name, service in services.items():
                await tg.start(service.run, buses[name], clock)
            yield buses
            tg.cancel_scope.cancel()
    finally:
        with anyio.CancelScope(shield=True):
            for bus in buses.values():
                await bus.close()


class AuditedReplay:
    """A replay of requests at their arrival times through whatever serves them, audited from
    the request stream: which requests were published, and how many times each one's
    completion and energy record were stored (both read through durable consumers)."""

    def __init__(self, requests: Sequence[RequestArrived], audit: Bus, replayer: Bus) -> None:
        self.requests = list(requests)
        self.audit = audit
        self.replayer = replayer
        self.published: list[str] = []
        self.completed: Counter[str] = Counter()
        self.billed: Counter[str] = Counter()
        self.completions: list[RequestCompleted] = []
        self._changed = anyio.Event()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    async def _until(self, done: Callable[[], bool]) -> None:
        while not done():
            await self._changed.wait()

    async def _on_completed(self, event: RequestEvent) -> None:
        if isinstance(event, RequestCompleted):
            self.completed[event.id] += 1
            self.completions.append(event)
            self._notify()

    async def _on_energy(self, record: RequestEnergy) -> None:
        self.billed[record.id] += 1
        self._notify()

    def _on_published(self, request: RequestArrived) -> None:
        self.published.append(request.id)
        self._notify()

    async def _run(self, clock: Clock, *,
                   task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        async with anyio.create_task_group() as tg:
            await tg.start(partial(self.audit.consume, durable="audit",
                                   subject=REQUEST_COMPLETED, codec=REQUEST_CODEC,
                                   handler=self._on_completed))
            await tg.start(partial(self.audit.consume, durable="bill", subject=ENERGY_REQUEST,
                                   codec=ENERGY_CODEC, handler=self._on_energy))
            task_status.started()
            await replay(self.replayer, clock, self.requests,
                         on_published=self._on_published)

    async def wait_published(self, count: int) -> None:
        await self._until(lambda: len(self.published) >= count)

    async def wait_served(self, *, settle_s: float = 1.0, timeout_s: float = 150.0) -> None:
        """Until every request is completed and billed, then `settle_s` more (time for a
        duplicate to show up); fails naming those still missing after `timeout_s`."""
        ids = {r.id for r in self.requests}
        with anyio.move_on_after(timeout_s):
            await self._until(lambda: len(self.completed) >= len(ids)
                              and len(self.billed) >= len(ids))
            await anyio.sleep(settle_s)
            return
        raise AssertionError(
            f"not served within {timeout_s:g} s: not completed "
            f"{sorted(ids - set(self.completed))}, not billed {sorted(ids - set(self.billed))}")

    def assert_served_once(self) -> None:
        """Every request completed and billed, none twice, nothing else."""
        ids = {r.id for r in self.requests}
        assert set(self.completed) == ids, f"not completed: {sorted(ids - set(self.completed))}"
        assert set(self.billed) == ids, f"not billed: {sorted(ids - set(self.billed))}"
        twice = sorted(i for i in ids if self.completed[i] > 1 or self.billed[i] > 1)
        assert not twice, f"completed or billed twice: {twice}"


@contextlib.asynccontextmanager
async def audited_replay(url: str, clock: Clock,
                         requests: Sequence[RequestArrived]) -> AsyncIterator[AuditedReplay]:
    """Replay `requests` on `url` (as the replayer service does) and audit what is stored,
    until the block ends."""
    audit = await Bus.connect(url, name="audit")
    replayer = await Bus.connect(url, name="replayer", service="replayer")
    try:
        await audit.ensure_request_stream()
        window = AuditedReplay(requests, audit, replayer)
        async with anyio.create_task_group() as tg:
            await tg.start(partial(window._run, clock))
            yield window
            tg.cancel_scope.cancel()
    finally:
        with anyio.CancelScope(shield=True):
            await audit.close()
            await replayer.close()


async def watch_decisions(bus: Bus) -> dict[str, RequestAdmitted | RequestDeferred]:
    """Subscribe `bus` to every admission and deferral; the dict it fills maps each request
    id to the latest decision seen for it (what a gateway watching the forecaster sees)."""
    decided: dict[str, RequestAdmitted | RequestDeferred] = {}

    async def on_event(event: RequestEvent) -> None:
        if isinstance(event, RequestAdmitted):
            decided[event.request.id] = event
        elif isinstance(event, RequestDeferred):
            decided[event.id] = event

    await bus.subscribe(REQUEST_ADMITTED_ALL, REQUEST_CODEC, on_event)
    await bus.subscribe(REQUEST_DEFERRED, REQUEST_CODEC, on_event)
    return decided


TEST_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}"
    "{{ eos_token }}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")


def write_test_tokenizer(folder: Path, *, template: str | None = TEST_CHAT_TEMPLATE,
                         max_position_embeddings: int = 512) -> Path:
    """A real byte-level BPE tokenizer trained here on a few lines, saved as a model folder
    saves it (tokenizer.json, tokenizer_config.json with a chat template, config.json), so
    the gateway can be tested without any model download. Needs the `gateway` extra."""
    from tokenizers import (  # noqa: PLC0415
        Tokenizer,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"])
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 20, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    config: dict[str, object] = {"bos_token": "<s>", "eos_token": {"content": "</s>"}}
    if template is not None:
        config["chat_template"] = template
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "config.json").write_text(json.dumps(
        {"max_position_embeddings": max_position_embeddings}))
    return folder


# --------------------------------------------------------------------------- NVML seam
# A small fake of exactly the `NvmlLib` functions (never a whole-module mock of pynvml),
# raising the real pynvml error codes: how the NVML backend's logic is tested without a GPU.


@dataclass
class Utilization:
    gpu: int
    memory: int


@dataclass
class FakeNvml:
    """One or more fake GPUs, alike but for their UUIDs, behind exactly the NvmlLib functions.

    `fail` maps a function name to the NVML error code it raises. Setters raise
    AssertionError unless `allow_set`, so a dry-run test fails if one is ever called.
    """

    count: int = 1
    power_mw: int = 250_500
    power_limit_mw: int = 700_000
    energy_mj: int = 123_456_789
    sm_clock_mhz: int = 1980
    mem_clock_mhz: int = 2619
    mem_clocks_mhz: list[int] = field(default_factory=lambda: [2619, 1593])
    sm_clocks_mhz: list[int] = field(default_factory=lambda: list(H100_SM_CLOCKS_DESCENDING))
    fail: dict[str, int] = field(default_factory=dict)
    allow_set: bool = False
    calls: list[tuple[object, ...]] = field(default_factory=list)

    def _enter(self, name: str, *args: object) -> None:
        self.calls.append((name, *args))
        if name in self.fail:
            raise pynvml.NVMLError(self.fail[name])

    def called(self, name: str) -> list[tuple[object, ...]]:
        return [c for c in self.calls if c[0] == name]

    def nvmlInit(self) -> None:
        self._enter("nvmlInit")

    def nvmlShutdown(self) -> None:
        self._enter("nvmlShutdown")

    def nvmlSystemGetDriverVersion(self) -> str:
        self._enter("nvmlSystemGetDriverVersion")
        return "570.86.15"

    def nvmlDeviceGetCount(self) -> int:
        self._enter("nvmlDeviceGetCount")
        return self.count

    def nvmlDeviceGetHandleByIndex(self, index: int, /) -> object:
        self._enter("nvmlDeviceGetHandleByIndex", index)
        return f"handle-{index}"

    def nvmlDeviceGetName(self, handle: object, /) -> bytes:
        self._enter("nvmlDeviceGetName", handle)
        return b"NVIDIA H100 80GB HBM3"

    def nvmlDeviceGetUUID(self, handle: object, /) -> str:
        self._enter("nvmlDeviceGetUUID", handle)
        index = int(str(handle).removeprefix("handle-"))
        return f"GPU-0b9c3a52-0000-0000-0000-{index:012d}"

    def nvmlDeviceGetPowerUsage(self, handle: object, /) -> int:
        self._enter("nvmlDeviceGetPowerUsage", handle)
        return self.power_mw

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: object, /) -> int:
        self._enter("nvmlDeviceGetTotalEnergyConsumption", handle)
        return self.energy_mj

    def nvmlDeviceGetClockInfo(self, handle: object, clock_type: int, /) -> int:
        self._enter("nvmlDeviceGetClockInfo", handle, clock_type)
        return self.sm_clock_mhz if clock_type == pynvml.NVML_CLOCK_SM else self.mem_clock_mhz

    def nvmlDeviceGetUtilizationRates(self, handle: object, /) -> Utilization:
        self._enter("nvmlDeviceGetUtilizationRates", handle)
        return Utilization(gpu=87, memory=41)

    def nvmlDeviceGetTemperature(self, handle: object, sensor: int, /) -> int:
        self._enter("nvmlDeviceGetTemperature", handle, sensor)
        return 54

    def nvmlDeviceGetEnforcedPowerLimit(self, handle: object, /) -> int:
        self._enter("nvmlDeviceGetEnforcedPowerLimit", handle)
        return self.power_limit_mw

    def nvmlDeviceGetSupportedMemoryClocks(self, handle: object, /) -> list[int]:
        self._enter("nvmlDeviceGetSupportedMemoryClocks", handle)
        return list(self.mem_clocks_mhz)

    def nvmlDeviceGetSupportedGraphicsClocks(self, handle: object, mem_mhz: int, /) -> list[int]:
        self._enter("nvmlDeviceGetSupportedGraphicsClocks", handle, mem_mhz)
        return list(self.sm_clocks_mhz) if mem_mhz == max(self.mem_clocks_mhz) else [1410]

    def nvmlDeviceSetGpuLockedClocks(self, handle: object, low: int, high: int, /) -> None:
        self._enter("nvmlDeviceSetGpuLockedClocks", handle, low, high)
        assert self.allow_set, "a setter was called"

    def nvmlDeviceResetGpuLockedClocks(self, handle: object, /) -> None:
        self._enter("nvmlDeviceResetGpuLockedClocks", handle)
        assert self.allow_set, "a setter was called"


def setup_policy(setup: str = DEFAULT_SETUP) -> tuple[Policy, EngineShape]:
    """The controller's clock policy and engine shape on a shipped setup, with the twin's own
    timing formula as the performance model (exact for the twin, no ONNX needed)."""
    from throttllem._twin.clockmodel import oracle_perf_model  # noqa: PLC0415
    from throttllem._twin.profile import load_profile  # noqa: PLC0415

    profile = load_profile(setup)
    return (clock_policy(profile.setup, oracle_perf_model(profile)),
            EngineShape.of(profile.setup))


def forecaster_service(*, instances: list[str], policy: str = "throttllem",
                       perf: PerfModel | None = None, setup: str = DEFAULT_SETUP,
                       **kwargs: Any) -> ForecasterService:
    """A forecaster on a shipped setup; a policy that plans gets the twin's own timing
    formula unless `perf` says otherwise."""
    from throttllem._services.forecaster import ForecasterService  # noqa: PLC0415
    from throttllem._twin.clockmodel import oracle_perf_model  # noqa: PLC0415
    from throttllem._twin.profile import load_profile  # noqa: PLC0415

    profile = load_profile(setup)
    if perf is None and POLICIES[policy].needs_perf:
        perf = oracle_perf_model(profile)
    return ForecasterService(instances=instances, policy=policy, setup=profile.setup,
                             perf=perf, **kwargs)


def crowded_perf(fits: int = 3) -> FunctionPerfModel:
    """A performance model under which an instance holds `fits` requests: 5 ms passes up to
    that batch, 1 s beyond, at every clock (so the next request must wait)."""

    def crowded(batch: AnyArray, kv_tokens: AnyArray, prefill_tokens: AnyArray,
                clock_mhz: AnyArray) -> AnyArray:
        return np.asarray(0.005 + 1.0 * (batch > fits)
                          + 0.0 * (kv_tokens + prefill_tokens + clock_mhz), np.float64)

    return FunctionPerfModel(crowded, name=f"crowded-{fits}")


def wait_for_metrics_url(log_path: Path, timeout_s: float = 30.0) -> str:
    """The `/metrics` URL a service started with `--metrics-port 0` logged, once it has."""
    from throttllem._demo_metrics import metrics_url_from_log  # noqa: PLC0415

    deadline = time.monotonic() + timeout_s
    while (url := metrics_url_from_log(log_path, 0)) is None:
        if time.monotonic() > deadline:
            raise AssertionError(f"no metrics.serving line in {log_path} after {timeout_s} s:\n"
                                 f"{log_path.read_text(errors='replace')}")
        time.sleep(0.05)
    return url


# The tiny model's context in the vLLM test session (tests/conftest.py): long enough that a
# request asking for most of it outlasts an abort's trip through the bus and the gateway.
TINY_TEST_CONTEXT = 16384
