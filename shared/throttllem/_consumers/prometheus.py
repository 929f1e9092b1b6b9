"""Per-tenant joules and tokens as Prometheus counters, each record counted once per id.

The counters live in the consumer service's registry (`--metrics-port`). A restart starts
them from zero, which Prometheus' `rate()` and `increase()` read as a counter reset, and the
durable consumer resumes after the last acked record, so rates stay right; the all-time
totals of a tenant are the ledger's job (use the ledger for billing, this for graphs).
"""

from __future__ import annotations

from throttllem import _metrics as m
from throttllem._consumers import Consumer, ConsumerContext, RecentIds
from throttllem._errors import ConfigError
from throttllem._events import RequestEnergy


class TenantEnergyExporter(Consumer):
    """`--option remember=N`: how many recent ids are kept for de-duplication (1000000)."""

    def __init__(self, context: ConsumerContext) -> None:
        self._joules = context.metrics.counter(m.TENANT_ENERGY)
        self._tokens = context.metrics.counter(m.TENANT_TOKENS)
        remember = context.option("remember", "1000000")
        if not remember.isdigit() or int(remember) < 1:


            raise ConfigError(f"--option remember must be a positive integer, not {remember!r}")
        self._seen = RecentIds(int(remember))

    async def on_energy(self, record: RequestEnergy) -> bool:
        if not self._seen.add(record.id):
            return False
        self._joules.labels(record.tenant).inc(max(record.energy_mj, 0.0) / 1e3)
        self._tokens.labels(record.tenant).inc(max(record.generated_tokens, 0))
        return True
