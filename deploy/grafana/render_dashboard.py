"""Draw the Grafana dashboard's panels from a real Prometheus, without Grafana.

It reads `throttllem.json` beside it, runs every panel's own PromQL (Grafana's `$__` variables
substituted as Grafana would for the chosen range; template variables set to "all") against a
Prometheus HTTP API, and draws the panels in the dashboard's grid layout into one PNG. It exists
so the README can show the dashboard with real data where no Grafana can run; it is not a
Grafana screenshot, and the picture's caption says so.

    python deploy/grafana/render_dashboard.py --prometheus http://127.0.0.1:9090 \
        --minutes 10 --out docs/dashboard.png
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

GRID_COLUMNS = 24  # Grafana's grid is 24 columns wide
DASHBOARD = Path(__file__).with_name("throttllem.json")

# Grafana unit ids used by the dashboard -> (axis label, factor applied to the values).
UNITS: dict[str, tuple[str, float]] = {
    "watt": ("W", 1.0),
    "J": ("J", 1.0),
    "rotmhz": ("MHz", 1.0),
    "ops": ("ops/s", 1.0),
    "reqps": ("req/s", 1.0),
    "percentunit": ("%", 100.0),
    "percent": ("%", 1.0),
    "s": ("s", 1.0),
    "short": ("", 1.0),
}

CAPTION = (
    "The dashboard deploy/grafana/throttllem.json: each panel's own PromQL, run against a real "
    "Prometheus (scrape interval {scrape}s) that scraped a `throttllem demo` run; drawn by "
    "deploy/grafana/render_dashboard.py with matplotlib because Grafana is not available "
    "here (not a Grafana screenshot). Range {start} to {end} UTC, step {step}s."
)


@dataclass(frozen=True)
class QueryWindow:
    """The time range a render covers, and what Grafana would derive from it."""

    start_s: float
    end_s: float
    step_s: float
    scrape_interval_s: float

    @property
    def rate_interval_s(self) -> float:
        """Grafana's `$__rate_interval`: max(interval + scrape interval, 4 × scrape interval)."""
        return max(self.step_s + self.scrape_interval_s, 4 * self.scrape_interval_s)


def _duration(seconds: float) -> str:
    """A PromQL duration (whole seconds, at least 1s)."""
    return f"{max(1, round(seconds))}s"


def substitute(expr: str, window: QueryWindow, variables: dict[str, str] | None = None) -> str:
    """The panel query with Grafana's variables replaced, as Grafana sends it to Prometheus.

    Built-ins: `$__rate_interval`, `$__interval`, `$__interval_ms`, `$__range`, `$__range_s`,
    `$__range_ms`. Template variables (`$name`, `${name}`, `${name:fmt}`, `[[name]]`) take the
    given value, else ".*" (Grafana's "All" as a regex). An unknown `$__` variable is an error,
    not a silently wrong query.
    """
    range_s = window.end_s - window.start_s
    builtins = {
        "__rate_interval": _duration(window.rate_interval_s),
        "__interval_ms": str(round(window.step_s * 1000)),
        "__interval": _duration(window.step_s),
        "__range_ms": str(round(range_s * 1000)),
        "__range_s": str(round(range_s)),
        "__range": _duration(range_s),
    }
    values = variables or {}

    def replace(match: re.Match[str]) -> str:
        name = match.group("braced") or match.group("bracket") or match.group("plain")
        if name.startswith("__"):
            if name not in builtins:
                raise ValueError(f"unsupported Grafana variable ${name} in: {expr}")
            return builtins[name]
        return values.get(name, ".*")

    pattern = r"\$\{(?P<braced>\w+)(?::\w+)?\}|\[\[(?P<bracket>\w+)\]\]|\$(?P<plain>\w+)"
    return re.sub(pattern, replace, expr)


def legend_name(legend_format: str | None, labels: dict[str, str]) -> str:
    """A series' legend: the target's `{{label}}` template filled in, else its label set."""
    if legend_format and legend_format != "__auto":
        return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""),
                      legend_format).strip()
    inner = ", ".join(f'{k}="{v}"' for k, v in sorted(labels.items()) if k != "__name__")
    return f"{labels.get('__name__', '')}{{{inner}}}" if inner else labels.get("__name__", "value")


@dataclass(frozen=True)
class Cell:
    """A panel's place in the figure, in figure fractions (matplotlib's add_axes order)."""

    left: float
    bottom: float
    width: float
    height: float


def grid_cell(grid_pos: dict[str, int], grid_height: int, *, top: float = 0.97,
              bottom: float = 0.04) -> Cell:
    """Map a Grafana gridPos (x, y, w, h; 24 columns, y down) onto the figure (y up), between
    the `bottom` and `top` fractions kept free for the caption and the title."""
    if grid_height <= 0:
        raise ValueError("the grid height must be positive")
    x, y, w, h = (int(grid_pos[k]) for k in ("x", "y", "w", "h"))
    if x < 0 or w <= 0 or x + w > GRID_COLUMNS or y < 0 or h <= 0 or y + h > grid_height:
        raise ValueError(f"gridPos {grid_pos} lies outside a {GRID_COLUMNS}×{grid_height} grid")
    unit = (top - bottom) / grid_height
    return Cell(left=x / GRID_COLUMNS, bottom=top - (y + h) * unit, width=w / GRID_COLUMNS,
                height=h * unit)


def grid_height(panels: list[dict[str, Any]]) -> int:
    """Rows of grid the dashboard uses."""
    return max(int(p["gridPos"]["y"]) + int(p["gridPos"]["h"]) for p in panels)


def query_range(prometheus: str, expr: str, window: QueryWindow) -> list[dict[str, Any]]:
    """One `/api/v1/query_range` call; its result series (`metric`, `values`)."""
    params = urllib.parse.urlencode({"query": expr, "start": window.start_s,
                                     "end": window.end_s, "step": window.step_s})
    url = f"{prometheus.rstrip('/')}/api/v1/query_range?{params}"
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            body = json.load(response)
    except urllib.error.HTTPError as error:  # a bad query: Prometheus says why in the body
        detail = json.loads(error.read() or b"{}").get("error", str(error))
        raise RuntimeError(f"Prometheus refused {expr!r}: {detail}") from error
    if body.get("status") != "success":
        raise RuntimeError(f"Prometheus refused {expr!r}: {body.get('error')}")
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def _finite(values: list[list[Any]], factor: float) -> tuple[list[datetime], list[float]]:
    times, ys = [], []
    for stamp, raw in values:
        value = float(raw)
        if math.isfinite(value):
            times.append(datetime.fromtimestamp(float(stamp), UTC))
            ys.append(value * factor)
    return times, ys


def _draw_panel(fig: Any, panel: dict[str, Any], cell: Cell, prometheus: str,
                window: QueryWindow) -> bool:
    """Draw one panel; False when none of its queries returned data."""
    import matplotlib.dates as mdates  # noqa: PLC0415  (drawing only: the pure parts need none)

    pad_x, pad_top, pad_bottom = 0.035, 0.022, 0.018
    ax = fig.add_axes((cell.left + pad_x, cell.bottom + pad_bottom,
                       cell.width - pad_x - 0.008, cell.height - pad_top - pad_bottom))
    ax.set_title(panel.get("title", ""), fontsize=9, loc="left")
    unit, factor = UNITS.get(panel.get("fieldConfig", {}).get("defaults", {}).get("unit", ""),
                             ("", 1.0))
    ax.tick_params(labelsize=7)
    drawn = 0
    bars: list[tuple[str, float]] = []
    for target in panel.get("targets", []):
        expr = substitute(target["expr"], window)
        for series in query_range(prometheus, expr, window):
            name = legend_name(target.get("legendFormat"), series["metric"])
            times, ys = _finite(series["values"], factor)
            if not ys:
                continue
            drawn += 1
            if panel["type"] == "timeseries":
                ax.plot(times, ys, linewidth=1.1, label=name)
            else:  # bargauge / stat: the last value of the range, as Grafana's lastNotNull
                bars.append((name, ys[-1]))
    if panel["type"] != "timeseries" and bars:
        bars.sort()
        ax.barh([b[0] for b in bars], [b[1] for b in bars], color="tab:green")
        ax.set_xlabel(unit, fontsize=7)
    elif drawn:
        ax.set_ylabel(unit, fontsize=7)
        ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M:%S", tz=UTC))  # type: ignore[no-untyped-call]
        ax.set_xlim(datetime.fromtimestamp(window.start_s, UTC),
                    datetime.fromtimestamp(window.end_s, UTC))
        ax.grid(alpha=0.3)
        handles, labels = ax.get_legend_handles_labels()
        shown = 8
        if len(labels) > shown:
            handles, labels = handles[:shown], [*labels[:shown - 1], f"… {len(labels) - 7} more"]
        ax.legend(handles, labels, fontsize=6, loc="upper left", ncol=2, framealpha=0.7)
    if not drawn:
        ax.set_xticks([])
        ax.set_yticks([])
        ax.text(0.5, 0.5, "no data", ha="center", va="center", fontsize=12, color="grey",
                transform=ax.transAxes)
    return bool(drawn)


def render(dashboard: dict[str, Any], prometheus: str, window: QueryWindow, out: Path,
           *, dpi: int = 72) -> list[str]:
    """Draw every panel into `out`; the titles of the panels that had no data."""
    import matplotlib  # noqa: PLC0415  (drawing only)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    panels = dashboard["panels"]
    height = grid_height(panels)
    fig = plt.figure(figsize=(18, height * 0.36))
    fig.suptitle(dashboard.get("title", "dashboard"), fontsize=14, y=0.995)
    empty = []
    for panel in panels:
        cell = grid_cell(panel["gridPos"], height)
        if panel["type"] == "row":
            fig.text(cell.left + 0.005, cell.bottom + cell.height / 2, panel.get("title", ""),
                     fontsize=11, fontweight="bold", va="center")
            continue
        if not _draw_panel(fig, panel, cell, prometheus, window):
            empty.append(panel.get("title", ""))
    stamp = "%Y-%m-%d %H:%M:%S"
    fig.text(0.5, 0.012, CAPTION.format(
        scrape=f"{window.scrape_interval_s:g}", step=f"{window.step_s:g}",
        start=datetime.fromtimestamp(window.start_s, UTC).strftime(stamp),
        end=datetime.fromtimestamp(window.end_s, UTC).strftime("%H:%M:%S")),
        ha="center", fontsize=8, wrap=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    plt.close(fig)
    return empty


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prometheus", default="http://127.0.0.1:9090",
                        help="Prometheus base URL (its HTTP API)")
    parser.add_argument("--dashboard", type=Path, default=DASHBOARD)
    parser.add_argument("--out", type=Path, default=Path("docs/dashboard.png"))
    parser.add_argument("--minutes", type=float, default=10.0,
                        help="range: this many minutes up to --end")
    parser.add_argument("--start", type=float, default=None,
                        help="range start, Unix seconds (overrides --minutes)")
    parser.add_argument("--end", type=float, default=None,
                        help="range end, Unix seconds (default: now)")
    parser.add_argument("--step", type=float, default=2.0, help="query step, seconds")
    parser.add_argument("--scrape-interval", type=float, default=2.0,
                        help="the Prometheus scrape interval, for $__rate_interval")
    parser.add_argument("--dpi", type=int, default=72)
    args = parser.parse_args(argv)
    if args.minutes <= 0 or args.step <= 0 or args.scrape_interval <= 0:
        parser.error("--minutes, --step and --scrape-interval must be positive")
    end_s = time.time() if args.end is None else args.end
    start_s = end_s - args.minutes * 60 if args.start is None else args.start
    if start_s >= end_s:
        parser.error("the range must start before it ends")
    window = QueryWindow(start_s=start_s, end_s=end_s, step_s=args.step,
                         scrape_interval_s=args.scrape_interval)
    dashboard = json.loads(args.dashboard.read_text())
    try:
        empty = render(dashboard, args.prometheus, window, args.out, dpi=args.dpi)
    except (urllib.error.URLError, RuntimeError, ValueError) as error:
        print(f"render_dashboard: {error}", file=sys.stderr)
        return 1
    print(f"wrote {args.out}")
    for title in empty:
        print(f"no data: {title}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
