"""Setup profiles: shipped data, sources on every number, clear errors on bad files."""

from __future__ import annotations

import json
import math
import re
from importlib import resources
from pathlib import Path

import pytest

from throttllem._data import data_file
from throttllem._errors import ConfigError
from throttllem._twin.profile import available_profiles, load_profile

NAME = "h100-llama3-8b-tp1"


def _shipped_text() -> str:
    return (resources.files("throttllem.profiles") / f"{NAME}.toml").read_text(encoding="utf-8")


def test_shipped_profile_loads_by_name_and_by_path(tmp_path: Path) -> None:
    assert NAME in available_profiles()
    p = load_profile(NAME)
    assert p.name == NAME
    assert p.engine.tp_degree == 1
    copy = tmp_path / "mine.toml"
    copy.write_text(_shipped_text(), encoding="utf-8")
    assert load_profile(copy) == load_profile(str(copy))
    assert load_profile(copy).time == p.time


def test_clocks_and_power_match_the_nvml_readout() -> None:
    p = load_profile(NAME)
    nvml = json.loads(data_file("gpu-profiles/h100-sxm-nvml.json").read_text())
    gr = nvml["supported_gr_clocks"]
    clocks = p.gpu.supported_clocks_mhz
    assert len(clocks) == gr["count"] == 110
    assert (clocks[0], clocks[-1]) == (gr["min"], gr["max"]) == (345, 1980)
    assert list(clocks[-5:][::-1]) == gr["first"]
    assert list(clocks[:5][::-1]) == gr["last"]
    assert p.gpu.name == nvml["name"]
    assert p.gpu.power_cap_w == nvml["enforced_limit_mw"] / 1000
    assert p.gpu.idle_power_w == nvml["power_mw"] / 1000
    assert p.gpu.mem_clock_mhz == nvml["clock_mem"]
    assert p.gpu.default_clock_mhz == nvml["default_app_clock_sm"]


def test_every_parameter_says_where_it_comes_from() -> None:
    p = load_profile(NAME)
    assert len(p.sources) == 40
    kinds = {"nvml": 0, "fitted": 0, "assumption": 0}
    for key, source in p.sources.items():
        assert source, key
        kinds["nvml"] += source.startswith("NVML readout")
        kinds["fitted"] += source.startswith("fitted to ../shared/data/gpu-profiles/")
        kinds["assumption"] += "assumption" in source
    assert kinds == {"nvml": 9, "fitted": 8, "assumption": kinds["assumption"]}
    assert kinds["assumption"] >= 8


def test_kv_capacity_follows_the_stated_arithmetic() -> None:
    p = load_profile(NAME)
    assert p.model.kv_bytes_per_token == 2 * 32 * 8 * 128 * 2 == 128 * 1024
    usable = 0.90 * p.gpu.memory_gib * 2**30
    activations = 3 * 2**30
    tokens = (usable - p.model.weight_bytes - activations) / p.model.kv_bytes_per_token
    assert p.engine.kv_blocks == math.floor(tokens / p.engine.block_tokens) == 27669
    # The measured table held 48 GiB of KV cache on this GPU; the twin's pool is larger.
    assert p.engine.kv_blocks * p.engine.block_tokens * p.model.kv_bytes_per_token > 48 * 2**30


def test_with_overrides_changes_validates_and_marks_source() -> None:
    p = load_profile(NAME)
    q = p.with_overrides({"engine.kv_blocks": 64, "time.latency_ms": 0.0})
    assert q.engine.kv_blocks == 64
    assert q.time.latency_ms == 0.0
    assert q.sources["engine.kv_blocks"] == "override"
    assert p.engine.kv_blocks == 27669  # the original is untouched
    with pytest.raises(ConfigError, match="unknown profile parameter"):
        p.with_overrides({"engine.nope": 1})
    with pytest.raises(ConfigError, match=r"engine\.kv_blocks = 0 must be > 0"):
        p.with_overrides({"engine.kv_blocks": 0})


def test_unknown_name_and_missing_file() -> None:
    with pytest.raises(ConfigError, match=f"no profile named 'nope'.*{NAME}"):
        load_profile("nope")
    with pytest.raises(ConfigError, match="cannot read profile file"):
        load_profile("/does/not/exist.toml")


@pytest.mark.parametrize(("edit", "message"), [
    (lambda t: t.replace('name = "h100', 'name = = "h100', 1), "not valid TOML"),
    (lambda t: re.sub(r"(?m)^tp_degree = .*\n", "", t), r"engine\.tp_degree is missing"),
    (lambda t: re.sub(r"(?m)^\[power\]", "[powerx]", t), r"section \[power\] is missing"),
    (lambda t: t.replace('layers = { value = 32, source = "Llama-3-8B config.json: '
                         'num_hidden_layers" }', "layers = 32"), r"model\.layers must be"),
    (lambda t: re.sub(r'(mem_clock_mhz = \{ value = 2619, source = )"[^"]*"', r'\1"  "', t),
     r"gpu\.mem_clock_mhz has no `source`"),
    (lambda t: t.replace("value = 2619", "value = 2619.5"), r"gpu\.mem_clock_mhz must be a int"),
    (lambda t: t.replace("value = 15,", "value = 14,"), "whole number of 14 MHz steps"),
    (lambda t: t.replace("[engine]\n", "[engine]\nspeed = { value = 1, source = \"x\" }\n"),
     r"unknown key\(s\) in \[engine\]: speed"),
    (lambda t: t.replace("static_w = { value = 180.0", "static_w = { value = -1.0"),
     r"power\.static_w = -1\.0 must be > 0"),
])
def test_bad_profile_files_fail_clearly(tmp_path: Path, edit: object, message: str) -> None:
    text = edit(_shipped_text())  # type: ignore[operator]
    assert text != _shipped_text()
    path = tmp_path / "bad.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError, match=message):
        load_profile(path)


@pytest.mark.parametrize("name", available_profiles())
def test_the_setups_clock_floor_is_its_power_models_most_efficient_clock(name: str) -> None:
    """The floor the controller reads from the setup is derived from the twin's power model;
    the file says so, and this keeps the two from drifting apart."""
    from throttllem._setup import load_setup  # noqa: PLC0415
    from throttllem._twin.clockmodel import efficient_clock_mhz  # noqa: PLC0415

    profile = load_profile(name)
    assert load_setup(name).controller.floor_mhz == efficient_clock_mhz(profile)
    setup = load_setup(name)
    for part in ("gpu", "model", "engine", "controller"):
        assert getattr(profile.setup, part) == getattr(setup, part)
