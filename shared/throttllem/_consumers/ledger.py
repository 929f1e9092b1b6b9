"""The per-tenant energy ledger: every `energy.request` record in a SQLite file, once.

The request id is the table's primary key, so a redelivered record is ignored (`INSERT OR
IGNORE`) and never counted twice, across restarts of the consumer too: the file, not memory,
remembers what was seen. Each record is committed before it is acked. `throttllem report
energy --ledger FILE` reads it; so can any SQLite client.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Final

from throttllem._consumers import Consumer, ConsumerContext
from throttllem._errors import ConfigError
from throttllem._events import RequestEnergy

SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS energy_request (
    id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    instance TEXT NOT NULL,
    energy_mj REAL NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    generated_tokens INTEGER NOT NULL,
    completed_s REAL NOT NULL,
    source TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS energy_request_completed ON energy_request (completed_s);
"""
COLUMNS: Final = ("id", "tenant", "instance", "energy_mj", "prompt_tokens", "generated_tokens",
                  "completed_s", "source")


def open_ledger(path: Path) -> sqlite3.Connection:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(path)
        db.executescript(SCHEMA)
        db.execute("PRAGMA journal_mode=WAL")
    except (OSError, sqlite3.Error) as e:
        raise ConfigError(f"cannot open the energy ledger {path}: {e}") from e
    return db


def read_ledger(path: Path, *, since_s: float | None = None,
                until_s: float | None = None) -> Iterator[RequestEnergy]:
    """The records of a ledger file completed in [since_s, until_s) (event time)."""
    if not path.is_file():
        raise ConfigError(f"no energy ledger at {path}")
    query = f"SELECT {', '.join(COLUMNS)} FROM energy_request WHERE completed_s >= ? " \
            "AND completed_s < ? ORDER BY completed_s"
    bounds = (float("-inf") if since_s is None else since_s,
              float("inf") if until_s is None else until_s)
    try:
        with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
            for row in db.execute(query, bounds):
                yield RequestEnergy(**dict(zip(COLUMNS, row, strict=True)))
    except sqlite3.Error as e:
        raise ConfigError(f"cannot read the energy ledger {path}: {e}") from e


class EnergyLedgerConsumer(Consumer):
    """`--option path=FILE` (default `energy-ledger.sqlite`)."""

    def __init__(self, context: ConsumerContext) -> None:
        self.path = Path(context.option("path", "energy-ledger.sqlite"))
        self._db: sqlite3.Connection | None = None

    async def open(self) -> None:
        self._db = open_ledger(self.path)

    async def on_energy(self, record: RequestEnergy) -> bool:
        assert self._db is not None, "open() first"
        with self._db:  # one transaction, committed before the record is acked
            cursor = self._db.execute(
                f"INSERT OR IGNORE INTO energy_request ({', '.join(COLUMNS)}) "
                f"VALUES ({', '.join('?' * len(COLUMNS))})",
                tuple(getattr(record, c) for c in COLUMNS))
        return cursor.rowcount == 1

    async def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
