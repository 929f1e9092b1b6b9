"""Which engine instances exist, where they listen, and what phase the scaler has them in.

The controller decides admissions; the gateway only proxies to where it was told. It must
still know every instance's URL (an admission to an instance it has no URL for is refused
with a clear error), and it follows the scaler's `scale.target` phases so that an admission
to a warming or draining instance, which the scaler contract forbids, is seen and counted.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final
from urllib.parse import urlsplit

from throttllem._errors import ConfigError
from throttllem._subjects import token

PHASES: Final = ("warming", "active", "draining")
_PHASE_RE: Final = re.compile(r"\b(warming|active|draining)=(\S+)")


def parse_instance(spec: str) -> tuple[str, str]:
    """`NAME=URL` (e.g. `i0=http://10.0.0.5:8000`) as (name, base URL without trailing /)."""
    name, sep, url = spec.partition("=")
    if not sep or not name.strip() or not url.strip():
        raise ConfigError(f"instance {spec!r} must be NAME=URL, e.g. i0=http://127.0.0.1:8000")
    url = url.strip().rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"instance {name!r}: {url!r} is not an http(s) URL")
    return token(name.strip()), url


def parse_instances(specs: Iterable[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for spec in specs:
        name, url = parse_instance(spec)
        if name in out:
            raise ConfigError(f"instance {name!r} is given twice")
        out[name] = url
    return out


def read_instances_file(path: Path) -> list[str]:
    """`NAME=URL` specs from a file, one a line (`#` comments and blank lines ignored)."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise ConfigError(f"cannot read the instances file {path}: {e.strerror or e}") from e
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def phases_of(reason: str) -> dict[str, str]:
    """Instance → phase from a `scale.target` reason's `warming=.. active=.. draining=..`
    (`-` for none); empty when the reason names no phases."""
    phases: dict[str, str] = {}
    for phase, names in _PHASE_RE.findall(reason):
        if names == "-":
            continue
        for name in names.split(","):
            if name:
                phases[name] = phase
    return phases


@dataclass
class InstanceRegistry:
    """Instance URLs (from configuration) and their latest phase (from the scaler)."""

    urls: dict[str, str]
    phases: dict[str, str] = field(default_factory=dict)

    def url(self, instance: str) -> str | None:
        return self.urls.get(instance)

    def admissible(self, instance: str) -> bool:
        """False when the scaler has the instance warming or draining (no phase known: the
        scaler is not running, every configured instance serves)."""
        return self.phases.get(instance, "active") == "active"

    def on_scale_target(self, reason: str) -> None:
        phases = phases_of(reason)
        if phases:
            self.phases = phases

    def describe(self) -> Mapping[str, Mapping[str, str]]:
        return {name: {"url": url, "phase": self.phases.get(name, "active")}
                for name, url in self.urls.items()}
