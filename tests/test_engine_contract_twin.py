"""The engine contract suite run for the twin engine, as `throttllem run engine --backend twin`
processes on a real nats-server; and the README shows the contract as the code writes it."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from throttllem._bus import EmbeddedNatsServer
from throttllem._engines.contract import ENGINE_SERVICE, contract_table
from throttllem._runtime import Clock
from throttllem._setup import DEFAULT_SETUP, load_setup
from throttllem._subjects import health
from throttllem.testing_engine_contract import EngineContractSuite, EngineProcess

# Event seconds per wall second: the twin's passes take milliseconds of event time.
SPEED = 10.0
README = Path(__file__).resolve().parents[1] / "services" / "README.md"


class TestTwinEngineContract(EngineContractSuite):
    # Admissions are acked once done (the engine shell): a restarted engine serves them.
    accepted_requests_survive_a_crash = True

    @pytest.fixture
    def engine(self, nats: EmbeddedNatsServer, tmp_path: Path) -> Iterator[EngineProcess]:
        clock = Clock(epoch_wall_s=time.time(), speed=SPEED)
        argv = [sys.executable, "-m", "throttllem", "run", "engine", "--backend", "twin",
                "--instance", "i0", "--setup", DEFAULT_SETUP, "--nats", nats.url,
                "--epoch-wall", repr(clock.epoch_wall_s), "--speed", str(SPEED)]
        with EngineProcess(argv, instance="i0", clock=clock, setup=load_setup(DEFAULT_SETUP),
                           health_subject=health(ENGINE_SERVICE),
                           log_path=tmp_path / "engine.log") as engine:
            yield engine


def test_the_readme_shows_the_contract_as_the_code_writes_it() -> None:
    assert contract_table() in README.read_text(), (
        "services/README.md's engine contract table differs from the code: paste the output "
        "of `python -m throttllem._engines.contract` there")
