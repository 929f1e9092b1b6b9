from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from throttllem._bus import EmbeddedNatsServer
from throttllem.testing import nats_server


@pytest.fixture
def nats(tmp_path: Path) -> Iterator[EmbeddedNatsServer]:
    """A fresh real nats-server per test, JetStream stored under tmp_path."""
    with nats_server(tmp_path / "nats") as server:
        yield server


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
