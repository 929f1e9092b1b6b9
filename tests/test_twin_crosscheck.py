"""The twin's prefill power per clock against published clock-locked H100 figures."""

from __future__ import annotations

import pytest

from throttllem._twin.crosscheck import PUBLISHED_PREFILL_RATIOS, prefill_power_ratios
from throttllem._twin.profile import load_profile


@pytest.mark.parametrize("setup", ["h100-llama3-8b-tp1", "h100-llama2-13b-tp2"])
def test_prefill_power_ratios_fall_in_the_published_range(setup: str) -> None:
    ratios = prefill_power_ratios(load_profile(setup))
    assert [r.clock_mhz for r in ratios] == list(PUBLISHED_PREFILL_RATIOS)
    for r in ratios:
        assert r.verdict == "within the published range", r
    assert ratios[0].twin_ratio < ratios[1].twin_ratio < 1.0  # lower clock, less power
