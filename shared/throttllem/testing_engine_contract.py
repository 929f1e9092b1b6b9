"""A reusable test suite for the engine contract (`throttllem._engines.contract`).

Any engine adapter's test module runs it over a real nats-server by subclassing
`EngineContractSuite` and providing an `engine` fixture: an `EngineUnderTest` that can
start, stop and restart one engine instance against the suite's `nats` server. An engine
launched as one command can use `EngineProcess`:

    class TestTwinEngineContract(EngineContractSuite):
        @pytest.fixture
        def engine(self, nats, tmp_path):
            with EngineProcess([...argv..., "--nats", nats.url], ...) as engine:
                yield engine

The suite talks to the engine only through the bus, as the rest of throttLL'eM does: it
publishes admissions and aborts, and watches iterations, completions, refusals and
heartbeats. Override `request()` when the engine needs more than token counts (e.g. a prompt
text for a real model), and `send()` when requests reach the engine another way (vLLM behind
the gateway: over HTTP, the suite admitting what the gateway announces;
tests/test_engine_contract_vllm.py). The promises are checked by plain functions
(`check_completion`, `check_iterations`, ...) that any such variant reuses.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import subprocess
from collections.abc import AsyncIterator, Callable, Collection, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import ClassVar, Protocol

import anyio
import anyio.to_thread
import pytest

from throttllem._bus import Bus, EmbeddedNatsServer
from throttllem._engines.contract import ADMISSION_ACK_WAIT_S
from throttllem._events import (
    ENGINE_CODEC,
    HEALTH_CODEC,
    REQUEST_CODEC,
    EngineIteration,
    Heartbeat,
    RequestAborted,
    RequestAdmitted,
    RequestArrived,
    RequestCompleted,
    RequestDeferred,
    RequestEvent,
)
from throttllem._runtime import Clock
from throttllem._setup import Setup
from throttllem._subjects import (
    REQUEST_ABORTED,
    REQUEST_ARRIVED,
    REQUEST_COMPLETED,
    REQUEST_DEFERRED,
    engine_iteration,
    request_admitted,
)
from throttllem.testing import nats_server

__all__ = ["EngineContractSuite", "EngineProcess", "EngineUnderTest", "EngineWatch",
           "check_completion", "check_heartbeat", "check_iterations", "check_never_completed",
           "check_refused"]

# How long the suite waits for something the contract promises (wall seconds); generous,
# because the machine running the tests may be busy.
PROMISED_WITHIN_S = 60.0
# Beyond the admissions' ack wait, how long a crashed engine's request may take to be back in
# a pass of its restart (the redelivery is polled; the first pass takes its time).
RESTART_MARGIN_S = 4.0


class EngineUnderTest(Protocol):
    """One engine instance the suite can start and stop against its nats-server."""

    instance: str
    clock: Clock  # the engine's event time
    max_model_len: int  # its context window in tokens: a prompt this long never fits
    health_subject: str  # where it heartbeats

    async def start(self) -> None:
        """Return once the engine consumes its admissions."""
        ...

    async def stop(self, *, kill: bool = False) -> None:
        """Stop it: gracefully, or as abruptly as a crash (`kill`)."""
        ...


class EngineProcess:
    """An `EngineUnderTest` that is one command; its output is appended to `log_path`, and
    it is ready once `ready_text` appears there."""

    def __init__(self, argv: Sequence[str], *, instance: str, clock: Clock,
                 setup: Setup | None = None, max_model_len: int | None = None,
                 health_subject: str, log_path: Path, ready_text: str = "service.ready",
                 start_timeout_s: float = PROMISED_WITHIN_S) -> None:
        self.argv = list(argv)
        self.instance = instance
        self.clock = clock
        # Its context window: the setup's, or as given for an engine without one (vLLM).
        if setup is not None:
            self.max_model_len = setup.model.max_model_len
        elif max_model_len is not None:
            self.max_model_len = max_model_len
        else:
            raise ValueError("give the engine's setup or its max_model_len")
        self.health_subject = health_subject
        self.log_path = log_path
        self.ready_text = ready_text
        self.start_timeout_s = start_timeout_s
        self._proc: subprocess.Popen[bytes] | None = None

    async def start(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            raise RuntimeError("the engine process is already running")
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        proc = self._proc = await anyio.to_thread.run_sync(self._spawn)
        with anyio.move_on_after(self.start_timeout_s):
            while True:
                with self.log_path.open("rb") as f:
                    f.seek(offset)
                    text = f.read().decode(errors="replace")
                if self.ready_text in text:
                    return
                if proc.poll() is not None:
                    raise AssertionError(
                        f"engine exited with {proc.returncode} before it was ready:\n"
                        f"{text[-3000:]}")
                await anyio.sleep(0.05)
        raise AssertionError(f"engine not ready after {self.start_timeout_s} s "
                             f"(no {self.ready_text!r} in {self.log_path})")

    def _spawn(self) -> subprocess.Popen[bytes]:
        with self.log_path.open("ab") as log:
            return subprocess.Popen(self.argv, stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                                    env={**os.environ, "PYTHONUNBUFFERED": "1"})

    async def stop(self, *, kill: bool = False) -> None:
        await anyio.to_thread.run_sync(self._stop, kill)

    def _stop(self, kill: bool) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def __enter__(self) -> EngineProcess:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop(kill=True)


class EngineWatch:
    """What an observer on the bus sees of one engine instance, and how it talks to it."""

    def __init__(self, bus: Bus, engine: EngineUnderTest) -> None:
        self.bus = bus
        self.engine = engine
        self.iterations: list[EngineIteration] = []
        # Seen live on core NATS (a retried durable publish may show twice here; the stream
        # keeps one: see `stored`).
        self.arrived: list[RequestArrived] = []  # announced by a gateway in front of it
        self.completed: dict[str, RequestCompleted] = {}
        self.deferred: dict[str, RequestDeferred] = {}
        self.aborted: dict[str, RequestAborted] = {}
        self.heartbeats: list[Heartbeat] = []
        # The request ids this watch admitted or aborted: `stored` reads only theirs, so an
        # engine (and a server) shared with earlier tests does not mix their history in.
        self.ids: set[str] = set()
        self._changed = anyio.Event()

    async def subscribe(self) -> None:
        instance = self.engine.instance

        async def on_iteration(it: EngineIteration) -> None:
            self.iterations.append(it)
            self.notify()

        async def on_request(event: RequestEvent) -> None:
            if isinstance(event, RequestCompleted) and event.instance == instance:
                self.completed[event.id] = event
            elif isinstance(event, RequestDeferred):
                self.deferred[event.id] = event
            elif isinstance(event, RequestAborted):
                self.aborted[event.id] = event
            elif isinstance(event, RequestArrived):
                self.arrived.append(event)
            self.notify()

        async def on_heartbeat(beat: Heartbeat) -> None:
            self.heartbeats.append(beat)
            self.notify()

        await self.bus.subscribe(engine_iteration(instance), ENGINE_CODEC, on_iteration)
        for subject in (REQUEST_ARRIVED, REQUEST_COMPLETED, REQUEST_DEFERRED, REQUEST_ABORTED):
            await self.bus.subscribe(subject, REQUEST_CODEC, on_request)
        await self.bus.subscribe(self.engine.health_subject, HEALTH_CODEC, on_heartbeat)

    def notify(self) -> None:
        """Wake `wait_for` (the bus handlers call this; so may a test's own tasks)."""
        self._changed.set()
        self._changed = anyio.Event()

    # ---- talking to the engine

    async def admit(self, request: RequestArrived, *, msg_id: str | None = None) -> None:
        """Publish an admission to this engine, as the controller does (durable)."""
        self.ids.add(request.id)
        await self.bus.publish_durable(
            request_admitted(self.engine.instance),
            RequestAdmitted(request=request, instance=self.engine.instance,
                            decided_s=max(request.arrival_s, self.engine.clock.now_s())),
            msg_id=msg_id or f"admitted-{request.id}")

    async def abort(self, request_id: str, *, instance: str | None = None,
                    cause: str = "client-disconnected") -> None:
        """Publish an abort, as the gateway does (durable); `instance` defaults to this one."""
        self.ids.add(request_id)
        await self.bus.publish_durable(REQUEST_ABORTED, RequestAborted(
            id=request_id, decided_s=self.engine.clock.now_s(),
            instance=self.engine.instance if instance is None else instance, cause=cause),
            msg_id=f"aborted-{request_id}")

    # ---- waiting and reading

    async def wait_for(self, what: str, done: Callable[[], bool], *,
                       timeout_s: float = PROMISED_WITHIN_S) -> None:
        """Wait until `done()` holds after some event arrived; fail saying `what` did not."""
        with anyio.move_on_after(timeout_s):
            while not done():
                await self._changed.wait()
            return
        raise AssertionError(f"not seen within {timeout_s} s: {what}")

    async def wait_completed(self, *ids: str) -> None:
        await self.wait_for(f"completions of {ids}", lambda: all(i in self.completed for i in ids))

    def passes_of(self, request_id: str) -> list[tuple[EngineIteration, int]]:
        """The passes that listed a request, each with the tokens it computed for it."""
        return [(it, it.request_tokens[k]) for it in self.iterations
                for k, rid in enumerate(it.request_ids) if rid == request_id]

    def tokens_of(self, request_id: str) -> int:
        return sum(n for _, n in self.passes_of(request_id))

    async def wait_accounted(self, done: RequestCompleted) -> None:
        """Wait until the iterations charge a finished request what the contract says (an
        engine may publish iterations and completions from different processes)."""
        want = done.prompt_tokens + done.generated_tokens - 1
        await self.wait_for(
            f"iterations of {done.id!r} adding up to {want} tokens (seen "
            f"{self.tokens_of(done.id)})", lambda: self.tokens_of(done.id) >= want)

    def counter(self, name: str) -> float:
        """A counter of the engine's latest heartbeat (0 before any)."""
        return self.heartbeats[-1].counters.get(name, 0) if self.heartbeats else 0

    async def stored(self) -> tuple[list[RequestCompleted], list[RequestDeferred]]:
        """What the durable stream holds for this watch's requests: this instance's
        completions, and every deferral."""
        completed = [e for e in await self.bus.history(REQUEST_COMPLETED, REQUEST_CODEC)
                     if isinstance(e, RequestCompleted) and e.instance == self.engine.instance
                     and e.id in self.ids]
        deferred = [e for e in await self.bus.history(REQUEST_DEFERRED, REQUEST_CODEC)
                    if isinstance(e, RequestDeferred) and e.id in self.ids]
        return completed, deferred


# --------------------------------------------------------------------------- the checks
# The contract's promises as plain functions of what a watch saw, so that a suite that
# reaches the engine another way (through a gateway) checks exactly the same.


def check_completion(watch: EngineWatch, request: RequestArrived, done: RequestCompleted,
                     stored: Sequence[RequestCompleted]) -> None:
    """One admitted request's completion: stored once, as seen live, consistent in itself,
    and charged by the iterations what it computed."""
    engine = watch.engine
    assert [c for c in stored if c.id == request.id] == [done]
    assert (done.instance, done.tenant, done.slo_class) == (
        engine.instance, request.tenant, request.slo_class)
    assert done.prompt_tokens == request.prompt_tokens
    assert 1 <= done.generated_tokens <= request.max_tokens
    assert done.arrival_s == request.arrival_s
    assert done.arrival_s <= done.admitted_s <= done.first_token_s <= done.completed_s
    assert math.isclose(done.ttft_ms, (done.first_token_s - done.arrival_s) * 1e3, abs_tol=1e-3)
    assert math.isclose(done.e2e_ms, (done.completed_s - done.arrival_s) * 1e3, abs_tol=1e-3)
    if done.generated_tokens > 1:
        assert math.isclose(
            done.tbt_mean_ms,
            (done.completed_s - done.first_token_s) / (done.generated_tokens - 1) * 1e3,
            rel_tol=1e-6, abs_tol=1e-3)
        assert done.tbt_mean_ms <= done.tbt_max_ms + 1e-6
    passes = watch.passes_of(request.id)
    assert len(passes) >= done.generated_tokens  # one token per pass, at most
    if done.preemptions == 0:
        assert watch.tokens_of(request.id) == done.prompt_tokens + done.generated_tokens - 1
    assert passes[0][0].start_s <= done.first_token_s
    assert passes[-1][0].start_s <= done.completed_s


def check_iterations(watch: EngineWatch) -> None:
    """Every pass seen: this instance's, each request once, tokens adding up, `seq` +1 per
    pass and starts in order."""
    assert watch.iterations, "no iteration seen"
    for it in watch.iterations:
        assert it.instance == watch.engine.instance
        assert it.batch_size == len(it.request_ids) == len(it.request_tokens)
        assert len(set(it.request_ids)) == len(it.request_ids)
        assert sum(it.request_tokens) == it.prefill_tokens + it.decode_tokens
    seqs = [it.seq for it in watch.iterations]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    starts = [it.start_s for it in watch.iterations]
    assert starts == sorted(starts)


def check_heartbeat(watch: EngineWatch) -> None:
    beat = watch.heartbeats[-1]
    assert watch.engine.health_subject.endswith(f".{beat.service}")


def check_refused(watch: EngineWatch, request_id: str, stored: Sequence[RequestCompleted],
                  deferred: Sequence[RequestDeferred]) -> None:
    """A request the engine can never serve: one final refusal with a reason, nothing else."""
    refusals = [d for d in deferred if d.id == request_id]
    assert len(refusals) == 1
    assert refusals[0].final
    assert refusals[0].reason
    assert request_id not in {c.id for c in stored}
    assert not watch.passes_of(request_id)


def check_never_completed(watch: EngineWatch, request_ids: Collection[str],
                          stored: Sequence[RequestCompleted],
                          deferred: Sequence[RequestDeferred]) -> None:
    """Aborted requests: no completion, no refusal, and gone from the last pass seen."""
    gone = set(request_ids)
    assert not gone & {c.id for c in stored}
    assert not gone & {d.id for d in deferred}
    assert not gone & set(watch.iterations[-1].request_ids)


class EngineContractSuite:
    """The engine contract as tests. Subclass it (as `Test...`) and provide `engine`.

    The tests reach the engine through `send` (by default: publish the admission, as the
    controller does); a suite for an engine behind a gateway overrides it to send the
    request over HTTP and admit what the gateway announces.
    """

    pytestmark: ClassVar[list[pytest.MarkDecorator]] = [pytest.mark.anyio, pytest.mark.slow]

    # True for an engine whose accepted requests survive a crash of its process, as ours do
    # (they ack an admission only once its request is done: `throttllem._engines.shell`).
    # Left False, the crash test is a strict xfail: an engine that acks at acceptance, or
    # keeps a request only in the memory of the process that dies, loses it.
    accepted_requests_survive_a_crash: ClassVar[bool] = False
    # Why they do not, for the strict xfail that says so.
    lost_in_a_crash_because: ClassVar[str] = (
        "not promised yet: an engine acks an admission when it accepts it, so a crash loses "
        "the request")
    # Generated tokens of the request kept running while it is aborted or its engine killed;
    # long enough to outlast the step that follows.
    long_output_tokens: ClassVar[int] = 3000
    # Generated tokens of the request whose engine is killed mid-way: long enough to outlast
    # the kill, short enough to be served again from the start within PROMISED_WITHIN_S.
    crash_output_tokens: ClassVar[int] = 3000

    @pytest.fixture
    def anyio_backend(self) -> str:
        return "asyncio"

    @pytest.fixture
    def nats(self, tmp_path: Path) -> Iterator[EmbeddedNatsServer]:
        with nats_server(tmp_path / "nats") as server:
            yield server

    def request(self, engine: EngineUnderTest, request_id: str, *, prompt_tokens: int,
                output_tokens: int) -> RequestArrived:
        """A request that generates exactly `output_tokens` (a real engine ignores EOS)."""
        return RequestArrived(id=request_id, arrival_s=engine.clock.now_s(),
                              prompt_tokens=prompt_tokens, max_tokens=output_tokens,
                              true_output_tokens=output_tokens, tenant="contract-suite",
                              slo_class="interactive")

    async def send(self, watch: EngineWatch, request: RequestArrived, *,
                   aborted_first: bool = False) -> RequestArrived:
        """Get `request` to the engine and admit it; returns the request as the engine knows
        it (its id is the one iterations and completions carry). `aborted_first`: an abort
        naming no instance (the request ended while waiting for admission) is published
        just before the admission, as a controller racing a client's disconnect does."""
        if aborted_first:
            await watch.abort(request.id, instance="")
        await watch.admit(request)
        return request

    @contextlib.asynccontextmanager
    async def watching(self, nats: EmbeddedNatsServer,
                       engine: EngineUnderTest) -> AsyncIterator[EngineWatch]:
        bus = await Bus.connect(nats.url, name="engine-contract-observer")
        try:
            await bus.ensure_request_stream()
            watch = EngineWatch(bus, engine)
            await watch.subscribe()
            await engine.start()
            try:
                yield watch
            finally:
                with anyio.CancelScope(shield=True):
                    await engine.stop()
        finally:
            with anyio.CancelScope(shield=True):
                await bus.close()

    async def sentinel(self, watch: EngineWatch, name: str = "sentinel",
                       output_tokens: int = 200) -> RequestCompleted:
        """Serve one more request and wait for it: whatever was admitted before it has had
        its chance to be (wrongly) served by then."""
        request = await self.send(watch, self.request(watch.engine, name, prompt_tokens=64,
                                                      output_tokens=output_tokens))
        await watch.wait_completed(request.id)
        done = watch.completed[request.id]
        await watch.wait_accounted(done)
        return done

    # ------------------------------------------------------------------ the contract

    async def test_admissions_are_served_with_iterations_and_one_consistent_completion(
            self, nats: EmbeddedNatsServer, engine: EngineUnderTest) -> None:
        shapes = [(17, 1), (40, 2), (120, 9), (300, 30), (64, 60), (1000, 17)]
        async with self.watching(nats, engine) as watch:
            requests = [await self.send(watch, self.request(
                engine, f"r{n}", prompt_tokens=p, output_tokens=o))
                for n, (p, o) in enumerate(shapes)]
            await watch.wait_completed(*(r.id for r in requests))
            for r in requests:
                await watch.wait_accounted(watch.completed[r.id])
            await watch.wait_for("a heartbeat", lambda: bool(watch.heartbeats))
            stored, deferred = await watch.stored()

        assert sorted(c.id for c in stored) == sorted(r.id for r in requests)
        assert not deferred
        for r in requests:
            check_completion(watch, r, watch.completed[r.id], stored)
        check_iterations(watch)
        check_heartbeat(watch)

    async def test_a_duplicate_admission_is_never_served_twice(
            self, nats: EmbeddedNatsServer, engine: EngineUnderTest) -> None:
        async with self.watching(nats, engine) as watch:
            request = await self.send(watch, self.request(engine, "dup", prompt_tokens=50,
                                                          output_tokens=20))
            # Distinct message ids, so that the stream keeps them: a redelivery, or a
            # controller re-admitting after its restart, looks like this to an engine.
            await watch.admit(request, msg_id=f"admitted-{request.id}-again")
            await watch.wait_completed(request.id)
            await watch.admit(request, msg_id=f"admitted-{request.id}-after-completion")
            await self.sentinel(watch)
            await watch.wait_for("both duplicates counted (admissions_duplicate)",
                                 lambda: watch.counter("admissions_duplicate") >= 2)
            stored, deferred = await watch.stored()

        done = watch.completed[request.id]
        assert [c.id for c in stored].count(request.id) == 1
        assert request.id not in {d.id for d in deferred}  # harmless: not refused either
        assert watch.tokens_of(request.id) == done.prompt_tokens + done.generated_tokens - 1

    async def test_a_request_that_can_never_fit_is_refused_for_good(
            self, nats: EmbeddedNatsServer, engine: EngineUnderTest) -> None:
        too_long = engine.max_model_len
        async with self.watching(nats, engine) as watch:
            huge = await self.send(watch, self.request(engine, "huge", prompt_tokens=too_long,
                                                       output_tokens=10))
            await watch.wait_for("a refusal of 'huge'", lambda: huge.id in watch.deferred)
            await self.sentinel(watch)
            stored, deferred = await watch.stored()

        check_refused(watch, huge.id, stored, deferred)

    async def test_an_aborted_request_stops_and_never_completes(
            self, nats: EmbeddedNatsServer, engine: EngineUnderTest) -> None:
        long = self.long_output_tokens
        async with self.watching(nats, engine) as watch:
            running = await self.send(watch, self.request(engine, "running", prompt_tokens=100,
                                                          output_tokens=long))
            await watch.wait_for("'running' in a pass",
                                 lambda: bool(watch.passes_of(running.id)))
            await watch.abort(running.id)
            # Aborted while still waiting for admission (no instance), then admitted anyway:
            # the abort and the admission may reach the engine in either order.
            raced = await self.send(watch, self.request(engine, "raced", prompt_tokens=100,
                                                        output_tokens=long),
                                    aborted_first=True)
            # An abort for another instance is not this engine's business.
            elsewhere = await self.send(watch, self.request(engine, "elsewhere",
                                                            prompt_tokens=100,
                                                            output_tokens=20))
            await watch.abort(elsewhere.id, instance=f"{engine.instance}-other")
            await self.sentinel(watch, output_tokens=400)
            await watch.wait_completed(elsewhere.id)
            stored, deferred = await watch.stored()

        assert elsewhere.id in {c.id for c in stored}
        check_never_completed(watch, (running.id, raced.id), stored, deferred)
        assert watch.tokens_of(running.id) < 100 + long - 1

    async def test_admissions_published_while_the_engine_is_down_are_served_after_restart(
            self, nats: EmbeddedNatsServer, engine: EngineUnderTest) -> None:
        async with self.watching(nats, engine) as watch:
            before = await self.send(watch, self.request(engine, "before", prompt_tokens=80,
                                                         output_tokens=20))
            await watch.wait_completed(before.id)
            await engine.stop(kill=True)
            while_down = [await self.send(watch, self.request(engine, name, prompt_tokens=80,
                                                              output_tokens=20))
                          for name in ("while-down-1", "while-down-2")]
            await engine.start()
            await watch.wait_completed(*(r.id for r in while_down))
            await self.sentinel(watch)
            stored, _ = await watch.stored()

        served = [c.id for c in stored]
        for r in (before, *while_down):
            assert served.count(r.id) == 1
        done = watch.completed[before.id]
        assert watch.tokens_of(before.id) == done.prompt_tokens + done.generated_tokens - 1

    async def test_a_request_accepted_by_an_engine_that_crashes_still_gets_an_outcome(
            self, nats: EmbeddedNatsServer, engine: EngineUnderTest,
            request: pytest.FixtureRequest) -> None:
        if not self.accepted_requests_survive_a_crash:
            request.applymarker(pytest.mark.xfail(strict=True,
                                                  reason=self.lost_in_a_crash_because))
        async with self.watching(nats, engine) as watch:
            in_flight = await self.send(watch, self.request(
                engine, "in-flight", prompt_tokens=100, output_tokens=self.crash_output_tokens))
            await watch.wait_for("'in-flight' in a pass",
                                 lambda: bool(watch.passes_of(in_flight.id)))
            await engine.stop(kill=True)
            served_before_crash = len(watch.passes_of(in_flight.id))
            await engine.start()
            # Its admission was never acked: it comes back to the restarted engine.
            await watch.wait_for(
                "'in-flight' served again by the restarted engine",
                lambda: len(watch.passes_of(in_flight.id)) > served_before_crash,
                timeout_s=ADMISSION_ACK_WAIT_S + RESTART_MARGIN_S)
            await watch.wait_for(
                "a completion, final refusal or abort of 'in-flight' after the crash",
                lambda: (in_flight.id in watch.completed or in_flight.id in watch.aborted
                         or in_flight.id in watch.deferred))
            await self.sentinel(watch)
            stored, deferred = await watch.stored()

        outcomes = [c.id for c in stored] + [d.id for d in deferred]
        assert outcomes.count(in_flight.id) == 1  # once: not lost, not served twice
