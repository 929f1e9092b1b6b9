"""A minimal, fast OpenAI-compatible completions server for measuring what the gateway adds.

It answers `POST /v1/completions` and `/v1/chat/completions` (streamed as SSE, or not) and
`GET /health` on plain asyncio (no framework), generating `max_tokens` one-character tokens
`--token-interval-ms` apart after `--ttft-ms`. Every streamed event carries `"t"`, the
CLOCK_MONOTONIC instant (ns) it was written, which every process on the host reads alike, so a
client can tell how long each token took to reach it, directly or through the gateway.

    python benchmarks/stub_upstream.py --port 8100 --token-interval-ms 40
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

HEAD_END = b"\r\n\r\n"


class StubProtocol(asyncio.Protocol):
    """One HTTP/1.1 keep-alive connection; requests are answered one after another."""

    def __init__(self, ttft_s: float, interval_s: float) -> None:
        self.ttft_s = ttft_s
        self.interval_s = interval_s
        self.buffer = b""
        self.transport: asyncio.Transport | None = None
        self.queue: asyncio.Queue[tuple[str, str, bytes]] = asyncio.Queue()
        self.worker: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.worker = asyncio.get_running_loop().create_task(self.serve())

    def connection_lost(self, exc: Exception | None) -> None:
        if self.worker is not None:
            self.worker.cancel()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(HEAD_END)
            if end < 0:
                return
            head = self.buffer[:end].decode("latin-1").split("\r\n")
            length = 0
            for line in head[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value.strip())
            if len(self.buffer) < end + 4 + length:
                return
            body = self.buffer[end + 4:end + 4 + length]
            self.buffer = self.buffer[end + 4 + length:]
            method, path, _ = head[0].split(" ", 2)
            self.queue.put_nowait((method, path, body))

    def write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def respond(self, status: str, body: bytes) -> None:
        self.write(f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\n"
                   f"content-length: {len(body)}\r\n\r\n".encode() + body)

    async def serve(self) -> None:
        while True:
            method, path, body = await self.queue.get()
            if method == "GET" and path == "/health":
                self.respond("200 OK", b"{}")
            elif method == "POST" and path in ("/v1/completions", "/v1/chat/completions"):
                await self.complete(json.loads(body), chat=path.endswith("chat/completions"))
            else:
                self.respond("404 Not Found", b'{"error":{"message":"not found"}}')

    async def complete(self, request: dict[str, Any], *, chat: bool) -> None:
        n = int(request.get("max_tokens") or 16)
        prompt = request.get("prompt", request.get("messages", ""))
        usage = {"prompt_tokens": len(prompt) if isinstance(prompt, list)
                 else len(str(prompt).split()), "completion_tokens": n,
                 "total_tokens": 0}
        kind = "chat.completion" if chat else "text_completion"
        if not request.get("stream"):
            await asyncio.sleep(self.ttft_s + self.interval_s * (n - 1))
            choice: dict[str, Any] = ({"message": {"role": "assistant", "content": "x" * n}}
                                      if chat else {"text": "x" * n})
            self.respond("200 OK", json.dumps({
                "id": "stub", "object": kind, "model": request.get("model"),
                "choices": [{"index": 0, "finish_reason": "length", **choice}],
                "usage": usage}).encode())
            return
        self.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                   b"transfer-encoding: chunked\r\n\r\n")
        delta = '"delta":{"content":"x"}' if chat else '"text":"x"'
        kind_chunk = "chat.completion.chunk" if chat else "text_completion"
        await asyncio.sleep(self.ttft_s)
        for k in range(n):
            if k:
                await asyncio.sleep(self.interval_s)
            event = (f'data: {{"id":"stub","object":"{kind_chunk}","t":{time.monotonic_ns()},'
                     f'"choices":[{{"index":0,{delta},"finish_reason":null}}]}}\n\n').encode()
            self.write(b"%x\r\n%s\r\n" % (len(event), event))
        tail = b""
        if (request.get("stream_options") or {}).get("include_usage"):
            tail += b"data: " + json.dumps({"id": "stub", "object": kind_chunk, "choices": [],
                                            "usage": usage}).encode() + b"\n\n"
        tail += b"data: [DONE]\n\n"
        self.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(tail), tail))


async def main(host: str, port: int, ttft_s: float, interval_s: float) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: StubProtocol(ttft_s, interval_s), host, port,
                                      backlog=4096)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--ttft-ms", type=float, default=0.0)
    parser.add_argument("--token-interval-ms", type=float, default=40.0)
    args = parser.parse_args()
    asyncio.run(main(args.host, args.port, args.ttft_ms / 1e3, args.token_interval_ms / 1e3))
