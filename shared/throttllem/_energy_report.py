"""`throttllem report energy`: per-tenant and per-instance energy, tokens and J/token from the
durable `energy.request` records (read from any NATS server's stream, or from a ledger file).

Reading and printing are shells around one pure function, `summarize()`. Records are
de-duplicated by request id (delivery is at least once, and a record published again after
the stream's de-duplication window is stored twice); the first copy counts.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec

from throttllem._errors import BusError, ConfigError
from throttllem._events import ENERGY_CODEC, RequestEnergy
from throttllem._subjects import ENERGY_REQUEST, REQUEST_STREAM


class Totals(msgspec.Struct, kw_only=True):
    requests: int = 0
    energy_j: float = 0.0
    prompt_tokens: int = 0
    generated_tokens: int = 0

    @property
    def j_per_token(self) -> float:
        """Joules per generated token (NaN with none generated)."""
        return self.energy_j / self.generated_tokens if self.generated_tokens else math.nan

    def add(self, record: RequestEnergy) -> None:
        self.requests += 1
        self.energy_j += record.energy_mj / 1e3
        self.prompt_tokens += record.prompt_tokens
        self.generated_tokens += record.generated_tokens

    def as_dict(self) -> dict[str, Any]:
        jpt = self.j_per_token
        return {"requests": self.requests, "energy_j": self.energy_j,
                "prompt_tokens": self.prompt_tokens, "generated_tokens": self.generated_tokens,
                "j_per_token": None if math.isnan(jpt) else jpt}


class EnergyReport(msgspec.Struct, kw_only=True):
    source: str
    since_s: float | None
    until_s: float | None
    tenants: dict[str, Totals]
    instances: dict[str, Totals]
    total: Totals
    duplicates: int
    first_completed_s: float | None
    last_completed_s: float | None
    id_prefix: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "source": self.source, "since_s": self.since_s, "until_s": self.until_s,
            "id_prefix": self.id_prefix,
            "first_completed_s": self.first_completed_s,
            "last_completed_s": self.last_completed_s, "duplicates": self.duplicates,
            "total": self.total.as_dict(),
            "tenants": {k: v.as_dict() for k, v in sorted(self.tenants.items())},
            "instances": {k: v.as_dict() for k, v in sorted(self.instances.items())},
        }


def summarize(records: Iterable[RequestEnergy], *, source: str, since_s: float | None = None,
              until_s: float | None = None, id_prefix: str | None = None) -> EnergyReport:
    """Totals of the records completed in [since_s, until_s) whose id starts with
    `id_prefix`, each request id once."""
    seen: set[str] = set()
    tenants: dict[str, Totals] = {}
    instances: dict[str, Totals] = {}
    total = Totals()
    duplicates = 0
    first: float | None = None
    last: float | None = None
    for r in records:
        if since_s is not None and r.completed_s < since_s:
            continue
        if until_s is not None and r.completed_s >= until_s:
            continue
        if id_prefix is not None and not r.id.startswith(id_prefix):
            continue
        if r.id in seen:
            duplicates += 1
            continue
        seen.add(r.id)
        tenants.setdefault(r.tenant, Totals()).add(r)
        instances.setdefault(r.instance, Totals()).add(r)
        total.add(r)
        first = r.completed_s if first is None else min(first, r.completed_s)
        last = r.completed_s if last is None else max(last, r.completed_s)
    return EnergyReport(source=source, since_s=since_s, until_s=until_s, tenants=tenants,
                        instances=instances, total=total, duplicates=duplicates,
                        first_completed_s=first, last_completed_s=last, id_prefix=id_prefix)


def parse_instant(value: str) -> float:
    """`--since`/`--until`: event-time seconds (a number; Unix time on a real deployment, trace
    time in a demo) or an ISO-8601 date-time (a naive one is UTC)."""
    try:
        return float(value)
    except ValueError:
        pass
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError as e:
        raise ConfigError(f"not a time: {value!r} (event-time seconds, or ISO 8601 like "
                          "2026-12-07T10:00)") from e
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


# --------------------------------------------------------------------------- reading


async def read_stream(url: str) -> list[RequestEnergy]:
    """Every energy record the request stream still holds (bounded by its retention)."""
    import nats.js.errors  # noqa: PLC0415

    from throttllem._bus import Bus  # noqa: PLC0415

    bus = await Bus.connect(url, name="report-energy",
                            hint="pass --nats the URL of the server the services use")
    try:
        try:
            await bus.js.stream_info(REQUEST_STREAM)
        except nats.js.errors.NotFoundError as e:
            raise BusError(f"NATS at {url} has no stream {REQUEST_STREAM}: no throttLL'eM "
                           "service has run against it (or its retention dropped it)") from e
        records = await bus.history(ENERGY_REQUEST, ENERGY_CODEC)
        rejected = bus.counters.get("rejected.energy", 0)
        if rejected:
            import structlog  # noqa: PLC0415

            structlog.get_logger("throttllem.report").warning(
                "report.records_rejected", count=rejected)
        return records
    finally:
        await bus.close()


# --------------------------------------------------------------------------- printing


def _fmt(x: float, digits: int = 1) -> str:
    return "–" if math.isnan(x) else f"{x:,.{digits}f}"


def format_table(report: EnergyReport) -> str:
    lines = [f"energy records from {report.source}: {report.total.requests} requests"
             + (f", {report.duplicates} duplicate deliveries ignored" if report.duplicates else "")]
    if report.first_completed_s is not None:
        lines.append(f"completed between {report.first_completed_s:.3f} s and "
                     f"{report.last_completed_s:.3f} s (event time)")
    header = (f"{'':<14}{'requests':>10}{'energy kJ':>12}{'prompt tok':>12}"
              f"{'gen tok':>11}{'J/token':>9}")
    for title, rows in (("tenant", report.tenants), ("instance", report.instances)):
        lines += ["", f"by {title}", header]
        for name, t in [*sorted(rows.items()), ("total", report.total)]:
            lines.append(f"{name[:14]:<14}{t.requests:>10,}{_fmt(t.energy_j / 1e3, 3):>12}"
                         f"{t.prompt_tokens:>12,}{t.generated_tokens:>11,}"
                         f"{_fmt(t.j_per_token, 3):>9}")
    return "\n".join(lines)


def write_json(report: EnergyReport, path: Path | None) -> str:
    text = json.dumps(report.as_dict(), indent=2)
    if path is not None:
        path.write_text(text + "\n")
    return text


def plot(report: EnergyReport, path: Path) -> None:
    """A PNG: energy (kJ) and J/token per tenant and per instance."""
    try:
        import matplotlib  # noqa: PLC0415

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError as e:
        raise ConfigError("--plot needs matplotlib: pip install 'throttllem[plot]'") from e
    fig, axes = plt.subplots(2, 2, figsize=(10, 6.5), constrained_layout=True)
    for col, (title, rows) in enumerate((("tenant", report.tenants),
                                         ("instance", report.instances))):
        names = sorted(rows)
        energy = [rows[n].energy_j / 1e3 for n in names]
        jpt = [rows[n].j_per_token for n in names]
        axes[0][col].bar(names, energy, color="#4c72b0")
        axes[0][col].set_title(f"energy by {title}")
        axes[0][col].set_ylabel("kJ")
        axes[1][col].bar(names, jpt, color="#dd8452")
        axes[1][col].set_title(f"energy per generated token by {title}")
        axes[1][col].set_ylabel("J/token")
        for ax in (axes[0][col], axes[1][col]):
            ax.tick_params(axis="x", labelrotation=30)
    fig.suptitle(f"throttLL'eM energy report: {report.total.requests} requests, "
                 f"{report.total.energy_j / 1e3:,.2f} kJ")
    fig.savefig(path, dpi=110)
    plt.close(fig)
