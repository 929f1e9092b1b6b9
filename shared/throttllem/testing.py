"""Testing helpers that ship with the package (as structlog's do): a real nats-server and
log capture. No in-memory fakes of the bus: tests talk to the real server."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from structlog.testing import capture_logs

from throttllem._bus import EmbeddedNatsServer

__all__ = ["capture_logs", "nats_server"]


@contextlib.contextmanager
def nats_server(store_dir: Path | None = None) -> Iterator[EmbeddedNatsServer]:
    """A real nats-server with JetStream on a free loopback port (read from its log)."""
    server = EmbeddedNatsServer(store_dir=store_dir)
    server.start()
    try:
        yield server
    finally:
        server.stop()
