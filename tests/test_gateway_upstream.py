"""The gateway's upstream connection pool against a real HTTP/1.1 server on loopback: one
connection serves request after request, concurrent requests each get their own, a response
closed early closes its connection (the engine sees the client leave), expired and
engine-closed connections are never reused, and failures are httpx's errors."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import anyio
import anyio.abc
import httpx
import pytest

from throttllem._gateway.upstream import UpstreamTransport

pytestmark = [pytest.mark.anyio]


@dataclass
class Server:
    url: str
    connections: int = 0
    closed_by_client: int = 0
    release: anyio.Event = field(default_factory=anyio.Event)


async def _serve(stream: anyio.abc.SocketStream, server: Server) -> None:
    server.connections += 1
    buffer = b""
    async with stream:
        while True:
            while b"\r\n\r\n" not in buffer:
                try:
                    buffer += await stream.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    server.closed_by_client += 1
                    return
            head, _, buffer = buffer.partition(b"\r\n\r\n")
            path = head.split(b" ")[1]
            if path == b"/wait":
                await server.release.wait()
            if path == b"/stream":
                await stream.send(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
                for n in range(50):
                    part = b"data: %d\n\n" % n
                    try:
                        await stream.send(b"%x\r\n%s\r\n" % (len(part), part))
                    except (anyio.BrokenResourceError, OSError):
                        server.closed_by_client += 1
                        return
                    await anyio.sleep(0.02)
                await stream.send(b"0\r\n\r\n")
                continue
            close = path == b"/close"
            await stream.send(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n"
                              + (b"connection: close\r\n" if close else b"") + b"\r\nok")
            if close:
                return


@contextlib.asynccontextmanager
async def http_server() -> AsyncIterator[Server]:
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    server = Server(url=f"http://127.0.0.1:{port}")
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, lambda s: _serve(s, server))
        yield server
        tg.cancel_scope.cancel()


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_one_connection_serves_request_after_request() -> None:
    transport = UpstreamTransport()
    async with http_server() as server, httpx.AsyncClient(transport=transport) as client:
        for _ in range(20):
            assert (await client.get(f"{server.url}/ok")).text == "ok"
        assert (transport.opened, server.connections) == (1, 1)
        assert transport.idle_connections() == 1


async def test_concurrent_requests_get_their_own_connections_then_reuse_them() -> None:
    transport = UpstreamTransport()
    async with http_server() as server, httpx.AsyncClient(transport=transport) as client:
        async def wait() -> None:
            assert (await client.get(f"{server.url}/wait")).text == "ok"

        async with anyio.create_task_group() as tg:
            for _ in range(5):
                tg.start_soon(wait)
            with anyio.fail_after(10):
                while server.connections < 5:
                    await anyio.sleep(0.01)
            server.release.set()
        assert transport.idle_connections() == 5
        for _ in range(10):
            await client.get(f"{server.url}/ok")
        assert (transport.opened, server.connections) == (5, 5)


async def test_a_response_closed_early_closes_its_connection() -> None:
    transport = UpstreamTransport()
    async with http_server() as server, httpx.AsyncClient(transport=transport) as client:
        async with client.stream("GET", f"{server.url}/stream") as response:
            async for chunk in response.aiter_raw():
                assert chunk.startswith(b"data: 0")
                break
        with anyio.fail_after(10):
            while not server.closed_by_client:
                await anyio.sleep(0.01)
        assert transport.idle_connections() == 0
        await client.get(f"{server.url}/ok")
        assert (transport.opened, server.connections) == (2, 2)


async def test_expired_and_engine_closed_connections_are_not_reused() -> None:
    transport = UpstreamTransport(keepalive_expiry_s=0.05)
    async with http_server() as server, httpx.AsyncClient(transport=transport) as client:
        await client.get(f"{server.url}/ok")
        await anyio.sleep(0.2)  # past the keep-alive: the next request opens a new one
        await client.get(f"{server.url}/ok")
        assert transport.opened == 2
        transport.keepalive_expiry_s = 60.0
        await client.get(f"{server.url}/close")  # on the second: the engine closes it
        await client.get(f"{server.url}/ok")
        assert (transport.opened, server.connections) == (3, 3)


async def test_failures_are_httpx_errors() -> None:
    with anyio.fail_after(10):
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
        port = listener.extra(anyio.abc.SocketAttribute.local_port)
        await listener.aclose()  # nothing listens there now
        async with httpx.AsyncClient(transport=UpstreamTransport()) as client:
            with pytest.raises(httpx.ConnectError):
                await client.get(f"http://127.0.0.1:{port}/ok")
