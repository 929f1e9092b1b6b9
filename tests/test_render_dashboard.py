"""The dashboard renderer's pure parts: Grafana variable substitution, legends, grid layout.

The script lives beside the dashboard (deploy/grafana/), outside the package, so it is imported
by path. Its Prometheus calls are not exercised here (no Prometheus in the test run).
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "deploy" / "grafana" / "render_dashboard.py"


def _load() -> Any:
    spec = importlib.util.spec_from_file_location("render_dashboard", SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


rd = _load()
WINDOW = rd.QueryWindow(start_s=1000.0, end_s=1600.0, step_s=2.0, scrape_interval_s=2.0)


def test_grafana_builtins_become_prometheus_durations() -> None:
    expr = ("rate(x[$__rate_interval]) + increase(y[$__range]) + z[$__interval]"
            " + $__range_s + $__interval_ms + ${__range_ms}")
    assert rd.substitute(expr, WINDOW) == (
        "rate(x[8s]) + increase(y[600s]) + z[2s] + 600 + 2000 + 600000")


def test_rate_interval_follows_grafanas_rule() -> None:
    wide_step = rd.QueryWindow(start_s=0.0, end_s=3600.0, step_s=15.0, scrape_interval_s=2.0)
    assert wide_step.rate_interval_s == 17.0  # step + scrape beats 4 × scrape
    assert WINDOW.rate_interval_s == 8.0       # 4 × scrape beats step + scrape


def test_template_variables_are_all_unless_given() -> None:
    expr = 'up{instance=~"$instance", job=~"${job:regex}", node=~"[[node]]"}'
    assert rd.substitute(expr, WINDOW) == 'up{instance=~".*", job=~".*", node=~".*"}'
    assert rd.substitute(expr, WINDOW, {"job": "demo"}) == (
        'up{instance=~".*", job=~"demo", node=~".*"}')


def test_an_unknown_builtin_is_an_error_not_a_wrong_query() -> None:
    with pytest.raises(ValueError, match=r"\$__from"):
        rd.substitute("x[$__from]", WINDOW)


def test_every_dashboard_query_substitutes_to_plain_promql() -> None:
    dashboard = json.loads(rd.DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert exprs
    for expr in exprs:
        assert "$" not in rd.substitute(expr, WINDOW)


def test_legend_fills_the_template_or_shows_the_labels() -> None:
    labels = {"__name__": "m", "instance": "i0", "outcome": "ok"}
    assert rd.legend_name("{{instance}} {{ outcome }}", labels) == "i0 ok"
    assert rd.legend_name("target {{missing}}", labels) == "target"
    assert rd.legend_name(None, labels) == 'm{instance="i0", outcome="ok"}'
    assert rd.legend_name("", {}) == "value"


def test_grid_cells_keep_grafanas_layout() -> None:
    height = 10
    left = rd.grid_cell({"x": 0, "y": 0, "w": 12, "h": 5}, height, top=1.0, bottom=0.0)
    right = rd.grid_cell({"x": 12, "y": 0, "w": 12, "h": 5}, height, top=1.0, bottom=0.0)
    below = rd.grid_cell({"x": 0, "y": 5, "w": 24, "h": 5}, height, top=1.0, bottom=0.0)
    assert (left.left, left.width, left.bottom, left.height) == (0.0, 0.5, 0.5, 0.5)
    assert right.left == pytest.approx(0.5)
    assert right.bottom == left.bottom  # same row, same height
    assert (below.left, below.width, below.bottom) == (0.0, 1.0, 0.0)  # y grows downwards


def test_grid_cells_stay_between_the_margins() -> None:
    dashboard = json.loads(rd.DASHBOARD.read_text())
    height = rd.grid_height(dashboard["panels"])
    for panel in dashboard["panels"]:
        cell = rd.grid_cell(panel["gridPos"], height, top=0.97, bottom=0.04)
        assert cell.bottom >= 0.04 - 1e-9
        assert cell.bottom + cell.height <= 0.97 + 1e-9
        assert cell.left + cell.width <= 1.0 + 1e-9


@pytest.mark.parametrize("pos", [
    {"x": 20, "y": 0, "w": 8, "h": 2},   # wider than 24 columns
    {"x": 0, "y": 9, "w": 4, "h": 2},    # below the grid
    {"x": 0, "y": 0, "w": 0, "h": 2},    # empty
])
def test_a_panel_outside_the_grid_is_a_clear_error(pos: dict[str, int]) -> None:
    with pytest.raises(ValueError, match=re.escape("outside a 24×10 grid")):
        rd.grid_cell(pos, 10)
