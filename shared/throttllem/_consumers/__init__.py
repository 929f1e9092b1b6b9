"""Plug-in consumers of the durable request stream: the interface and how plug-ins are found.

A plug-in is a class (or any callable) registered under the entry-point group
`throttllem.consumers`; `throttllem run consumer --plugin NAME` calls it with a
`ConsumerContext` and feeds the object it returns every `energy.request` record (and, if it
asks, every `request.completed` event) from the JetStream stream `TLLM_REQUESTS`, through its
own durable consumer. Delivery is at least once: a record is acked only after the plug-in's
handler returned, so a crash or restart redelivers what was not acked; a plug-in that must
count each record once de-duplicates by `record.id` (both shipped plug-ins do). A handler that
raises has its record redelivered after a second (up to 20 times); a payload that does not
decode never reaches a plug-in.

The public import path is `throttllem.consumers`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, entry_points
from typing import Final

from throttllem._errors import ConfigError
from throttllem._events import RequestCompleted, RequestEnergy
from throttllem._metrics import ServiceMetrics

ENTRY_POINT_GROUP: Final = "throttllem.consumers"


@dataclass(frozen=True)
class ConsumerContext:
    """What a plug-in is built with.

    `options`: the `--option KEY=VALUE` pairs of the command line (strings; the plug-in
    validates them and raises ConfigError for a bad one). `metrics`: the consumer service's
    registry, served on `--metrics-port`; a plug-in may create its own instruments there.
    """

    plugin: str
    durable: str
    options: Mapping[str, str] = field(default_factory=dict)
    metrics: ServiceMetrics = field(default_factory=lambda: ServiceMetrics("consumer"))

    def option(self, key: str, default: str | None = None) -> str:
        value = self.options.get(key, default)
        if value is None:
            raise ConfigError(f"consumer plug-in {self.plugin!r} needs --option {key}=VALUE")
        return value


class Consumer:
    """Base class of a plug-in: override what you need; every handler may be called again
    for a record it has seen (at-least-once delivery).

    Handlers return True for a record they took, False for one they recognised as a duplicate
    and ignored, None when they do not tell (the service counts the outcome).
    """

    #: Also receive `request.completed` events (latencies, SLO class) on a second durable.
    wants_completions: bool = False

    async def open(self) -> None:
        """Called once before the first record (open files, connections)."""

    async def on_energy(self, record: RequestEnergy) -> bool | None:
        return None

    async def on_completed(self, event: RequestCompleted) -> bool | None:
        return None

    async def close(self) -> None:
        """Called once at shutdown, after the last handler returned."""


Factory = Callable[[ConsumerContext], Consumer]


class RecentIds:
    """The last `capacity` ids seen, for de-duplicating redeliveries in memory (a redelivery
    comes within the stream's ack wait, long before `capacity` newer records)."""

    def __init__(self, capacity: int = 1_000_000) -> None:
        self._ids: OrderedDict[str, None] = OrderedDict()
        self._capacity = capacity

    def add(self, record_id: str) -> bool:
        """True the first time `record_id` is seen."""
        if record_id in self._ids:
            return False
        self._ids[record_id] = None
        if len(self._ids) > self._capacity:
            self._ids.popitem(last=False)
        return True


def available_plugins() -> dict[str, EntryPoint]:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def load_plugin(name: str) -> Factory:
    """The factory registered as `name`, or a clear error naming the installed ones."""
    found = available_plugins()
    if name not in found:
        known = ", ".join(sorted(found)) or "none"
        raise ConfigError(f"no consumer plug-in {name!r} in the entry-point group "
                          f"{ENTRY_POINT_GROUP!r} (installed: {known}); a plug-in package "
                          f"declares [project.entry-points.\"{ENTRY_POINT_GROUP}\"]")
    try:
        factory = found[name].load()
    except Exception as e:
        raise ConfigError(f"consumer plug-in {name!r} ({found[name].value}) failed to "
                          f"load: {e!r}") from e
    if not callable(factory):
        raise ConfigError(f"consumer plug-in {name!r} ({found[name].value}) is not callable")
    return factory  # type: ignore[no-any-return]


__all__ = ["ENTRY_POINT_GROUP", "Consumer", "ConsumerContext", "Factory", "RecentIds",
           "available_plugins", "load_plugin"]
