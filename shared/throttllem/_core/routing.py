"""Where the default policy sends a request: the instance with the fewest outstanding
requests (join-shortest-queue), ties broken by name so runs are reproducible."""

from __future__ import annotations

from collections.abc import Mapping

from throttllem._errors import ConfigError


def least_loaded(outstanding: Mapping[str, int]) -> str:
    if not outstanding:
        raise ConfigError("no engine instances configured")
    return min(outstanding, key=lambda name: (outstanding[name], name))
