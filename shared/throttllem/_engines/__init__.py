"""Engines: the engine contract (`contract`) and its adapters (`twin`, `gpu`).

An adapter turns one serving engine instance into a party on the bus that keeps the contract
in `throttllem._engines.contract`. `BACKENDS` names every engine `throttllem run engine
--backend` knows, including those that run elsewhere, so that asking for one says where it is.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Final

from throttllem._errors import ConfigError

DEFAULT_BACKEND: Final = "twin"

# Each backend `throttllem run engine --backend` names, in a few words.
BACKENDS: Final[Mapping[str, str]] = MappingProxyType({
    "twin": "the engine twin on a simulated GPU",
    "gpu": "our decode loop on a real GPU",
    "vllm": "vLLM",
})
# Those that run inside `throttllem run engine`; the others say where they run instead.
RUNNABLE_BACKENDS: Final = frozenset({"twin", "gpu"})
_RUNS_ELSEWHERE: Final[Mapping[str, str]] = MappingProxyType({
    "vllm": ("vLLM runs as its own server, not inside `throttllem run engine`: start it "
             "with `--scheduler-cls throttllem._engines.vllm.scheduler.iteration_scheduler` "
             "and THROTTLLEM_INSTANCE (it publishes the iterations; README, 'The vLLM "
             "adapter') and route requests through throttllem's gateway (it keeps the rest "
             "of the engine contract; see services/README.md, 'The engine contract')"),
})


def check_backend(backend: str) -> str:
    """The backend itself if `throttllem run engine` can run it; otherwise a ConfigError
    saying where it runs."""
    if backend in RUNNABLE_BACKENDS:
        return backend
    if backend in BACKENDS:
        raise ConfigError(f"engine backend {backend!r} ({BACKENDS[backend]}): "
                          f"{_RUNS_ELSEWHERE[backend]}")
    raise ConfigError(f"unknown engine backend {backend!r}; known: {', '.join(BACKENDS)}")
