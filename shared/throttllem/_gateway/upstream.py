"""The gateway's connections to the engines: an httpx transport with a pool that costs the
same at 1 and at 1,000 open streams.

httpx's own pool (httpcore's) walks every pooled connection, checking each one's socket,
whenever a request starts or ends, and counts the idle ones once per idle connection, so its
cost grows with the square of the open streams: with a few hundred streams it was most of
the gateway's CPU. This pool keeps each origin's idle connections on a stack: a request
takes the most recently used one (checking that one only: not past its keep-alive, not
closed by the engine) or opens a new one, and a response read to its end gives its
connection back. A response closed early closes its connection (that is how the engine
learns that a client went away). Errors are httpx's, as with httpx's own transport.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from typing import Final

import httpcore
import httpx

# Opening a new connection when a pooled one turns out to be closing is retried this often.
STALE_RETRIES: Final = 2


@contextlib.contextmanager
def _httpx_errors(request: httpx.Request) -> Iterator[None]:
    """httpcore's errors as the httpx errors of the same name (what callers catch)."""
    try:
        yield
    except (httpcore.TimeoutException, httpcore.NetworkError, httpcore.ProtocolError,
            httpcore.ProxyError, httpcore.UnsupportedProtocol) as e:
        mapped = getattr(httpx, type(e).__name__, None)
        if not (isinstance(mapped, type) and issubclass(mapped, httpx.TransportError)):
            mapped = httpx.TransportError
        raise mapped(str(e) or type(e).__name__, request=request) from e


def _key(origin: httpcore.Origin) -> tuple[bytes, bytes, int]:
    return origin.scheme, origin.host, origin.port


class _Idle:
    __slots__ = ("connection", "expires_at")

    def __init__(self, connection: httpcore.AsyncHTTPConnection, expires_at: float) -> None:
        self.connection = connection
        self.expires_at = expires_at


class UpstreamTransport(httpx.AsyncBaseTransport):
    """HTTP/1.1 to the engines, no connection limit, idle connections kept
    `keepalive_expiry_s` (below the engines' own keep-alive, so that the engine never closes
    a connection just as a request is sent on it)."""

    def __init__(self, *, keepalive_expiry_s: float = 2.0) -> None:
        self.keepalive_expiry_s = keepalive_expiry_s
        self._idle: dict[tuple[bytes, bytes, int], list[_Idle]] = {}  # by origin
        self.opened = 0  # connections opened so far (tests and metrics read it)

    def idle_connections(self) -> int:
        return sum(len(stack) for stack in self._idle.values())

    async def _take(self, origin: httpcore.Origin) -> httpcore.AsyncHTTPConnection:
        stack = self._idle.get(_key(origin))
        now = time.monotonic()
        while stack:
            idle = stack.pop()
            connection = idle.connection
            if now < idle.expires_at and connection.is_available() \
                    and not connection.has_expired():
                return connection
            await connection.aclose()
        self.opened += 1
        return httpcore.AsyncHTTPConnection(origin, keepalive_expiry=self.keepalive_expiry_s)

    async def give_back(self, origin: httpcore.Origin,
                         connection: httpcore.AsyncHTTPConnection) -> None:
        if not connection.is_idle():  # closed, or its response was not read to the end
            await connection.aclose()
            return
        now = time.monotonic()
        stack = self._idle.setdefault(_key(origin), [])
        # The bottom of the stack is the longest idle: drop what has expired there (cheap:
        # no socket is checked), so that a burst's surplus connections do not linger.
        expired = 0
        while expired < len(stack) and stack[expired].expires_at <= now:
            expired += 1
        for idle in stack[:expired]:
            await idle.connection.aclose()
        del stack[:expired]
        stack.append(_Idle(connection, now + self.keepalive_expiry_s))

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        origin = httpcore.Origin(url.raw_scheme, url.raw_host,
                                 url.port or (443 if url.raw_scheme == b"https" else 80))
        assert isinstance(request.stream, httpx.AsyncByteStream)
        core = httpcore.Request(
            method=request.method,
            url=httpcore.URL(scheme=url.raw_scheme, host=url.raw_host, port=url.port,
                             target=url.raw_path),
            headers=request.headers.raw, content=request.stream,
            extensions=request.extensions)
        for attempt in range(STALE_RETRIES + 1):
            connection = await self._take(origin)
            try:
                with _httpx_errors(request):
                    response = await connection.handle_async_request(core)
            except httpcore.ConnectionNotAvailable:
                # A pooled connection the engine had begun to close: take another.
                await connection.aclose()
                if attempt == STALE_RETRIES:
                    raise httpx.ConnectError("no usable connection to the engine",
                                             request=request) from None
                continue
            except BaseException:
                await connection.aclose()
                raise
            return httpx.Response(
                status_code=response.status, headers=response.headers,
                stream=_PooledStream(self, origin, connection, response, request),
                extensions=response.extensions)
        raise AssertionError("unreachable")

    async def aclose(self) -> None:
        stacks, self._idle = self._idle, {}
        for stack in stacks.values():
            for idle in stack:
                await idle.connection.aclose()


class _PooledStream(httpx.AsyncByteStream):
    """A response body that gives its connection back to the pool once closed."""

    def __init__(self, pool: UpstreamTransport, origin: httpcore.Origin,
                 connection: httpcore.AsyncHTTPConnection, response: httpcore.Response,
                 request: httpx.Request) -> None:
        self._pool = pool
        self._origin = origin
        self._connection = connection
        self._response = response
        self._request = request
        self._closed = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        with _httpx_errors(self._request):
            async for part in self._response.aiter_stream():
                yield part

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            with _httpx_errors(self._request):
                await self._response.aclose()
        finally:
            await self._pool.give_back(self._origin, self._connection)
