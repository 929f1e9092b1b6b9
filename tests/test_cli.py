"""The command line: errors a user sees are one clear line, never a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from throttllem._bus import EmbeddedNatsServer
from throttllem._cli import build_parser, main

pytestmark = pytest.mark.slow


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "throttllem", *args], capture_output=True,
                          text=True, timeout=60, check=False)


def test_unreachable_nats_is_one_clear_line() -> None:
    result = run_cli("run", "forecaster", "--instances", "i0", "--nats", "nats://127.0.0.1:1")
    assert result.returncode == 2
    assert "throttllem: error: cannot reach NATS at nats://127.0.0.1:1" in result.stderr
    assert "Traceback" not in result.stderr


def test_nvml_without_a_driver_says_what_to_do(nats: EmbeddedNatsServer) -> None:
    for args in (("actuator", "--instance", "i0", "--gpu", "nvml", "--dry-run"),
                 ("telemetry", "--gpu", "nvml")):
        result = run_cli("run", *args, "--nats", nats.url)
        assert result.returncode == 2, result.stderr
        assert "use the twin backend with --gpu twin" in result.stderr
        assert "Traceback" not in result.stderr


def test_bad_instance_names_are_refused_before_starting() -> None:
    assert main(["run", "engine", "--instance", "i.0", "--nats", "nats://127.0.0.1:1"]) == 2


def test_an_engine_backend_that_does_not_run_here_says_where_it_runs() -> None:
    # Refused before any connection is tried (the URL is unreachable on purpose).
    result = run_cli("run", "engine", "--backend", "vllm", "--instance", "i0",
                     "--nats", "nats://127.0.0.1:1")
    assert result.returncode == 2
    assert "throttllem: error: engine backend 'vllm'" in result.stderr
    assert "vllm serve" in result.stderr
    assert "cannot reach NATS" not in result.stderr
    assert "Traceback" not in result.stderr
    result = run_cli("run", "engine", "--backend", "tensorrt", "--instance", "i0")
    assert result.returncode == 2
    assert "invalid choice: 'tensorrt' (choose from 'twin', 'gpu', 'vllm')" in result.stderr
    assert build_parser().parse_args(["run", "engine", "--instance", "i0"]).backend == "twin"


def test_every_service_has_a_run_subcommand() -> None:
    parser = build_parser()
    for name in ("engine", "forecaster", "telemetry", "actuator", "length-predictor",
                 "replayer", "scaler"):
        args = parser.parse_args(["run", name, *{
            "engine": ["--instance", "i0"], "forecaster": ["--instances", "i0"],
            "actuator": ["--instance", "i0"],
            "scaler": ["--instances", "i0", "--capacity", "12"]}.get(name, [])])
        assert args.service == name


def test_every_service_folder_is_a_run_subcommand_and_back() -> None:
    from pathlib import Path  # noqa: PLC0415

    from throttllem._cli import SERVICES  # noqa: PLC0415

    root = Path(__file__).resolve().parents[1] / "services"
    folders = {p.name for p in root.iterdir() if (p / "Containerfile").is_file()}
    assert folders == set(SERVICES)


def test_a_bad_slo_config_is_one_clear_line(tmp_path: Path) -> None:
    bad = tmp_path / "slo.toml"
    bad.write_text("[standard]\ntbt = 40\n")
    result = run_cli("run", "forecaster", "--instances", "i0", "--slo-config", str(bad),
                     "--nats", "nats://127.0.0.1:1")
    assert result.returncode == 2
    assert f"{bad}: [standard] has unknown key(s) ['tbt']" in result.stderr
    assert "Traceback" not in result.stderr
    result = run_cli("demo", "--slo-class", "gold", "--no-progress")
    assert result.returncode == 2
    assert "unknown SLO class 'gold'" in result.stderr
    assert "Traceback" not in result.stderr
