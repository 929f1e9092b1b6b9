"""PNG plots of an evaluation: energy over time, clock over time, TBT and E2E distributions.

matplotlib is an optional extra (`pip install 'throttllem[plot]'`): the evaluator's figures
never depend on it, and without it `throttllem evaluate` says how to get the plots.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from throttllem._errors import ThrottllemError
from throttllem._eval.sim import Timeline


class PlottedRun(Protocol):
    """What a plot needs of one policy's run (an evaluation's or a live demo's)."""

    @property
    def timeline(self) -> Timeline: ...
    @property
    def tbt_ms(self) -> Sequence[float]: ...
    @property
    def e2e_ms(self) -> Sequence[float]: ...


class PlotsUnavailableError(ThrottllemError, RuntimeError):
    """matplotlib is not installed."""


def _pyplot() -> Any:
    try:
        import matplotlib  # noqa: PLC0415

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError as e:
        raise PlotsUnavailableError(
            "plots skipped: matplotlib is not installed (pip install 'throttllem[plot]')"
        ) from e
    return plt


def write_plots(runs: Mapping[str, PlottedRun], folder: Path, *,
                note: str = "simulated (serving twin), not measured",
                time_axis: str = "simulated time (min)") -> list[Path]:
    """Write energy.png, clock.png, tbt.png and e2e.png into `folder`; returns the paths."""
    plt = _pyplot()
    folder.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    # Policies that behave alike draw the same curve: vary the dash so none hides another.
    styles = {name: ("-", "--", ":", "-.")[k % 4] for k, name in enumerate(runs)}

    def save(fig: object, name: str) -> None:
        path = folder / name
        fig.savefig(path, dpi=110, bbox_inches="tight")  # type: ignore[attr-defined]
        plt.close(fig)
        written.append(path)

    fig, ax = plt.subplots(figsize=(8, 4))
    for name, run in runs.items():
        tl = run.timeline
        t = np.asarray(tl.t_s)
        widths = np.diff(np.concatenate([[0.0], t]))
        power_kw = np.asarray(tl.energy_j) / np.maximum(widths, 1e-9) / 1e3
        ax.step(t / 60, power_kw, where="post", label=name, linewidth=1,
                linestyle=styles[name])
    ax.set(xlabel=time_axis, ylabel="mean power, all GPUs (kW)",
           title=f"Energy over time ({note})")
    ax.legend(fontsize=8)
    save(fig, "energy.png")

    fig, ax = plt.subplots(figsize=(8, 4))
    for name, run in runs.items():
        tl = run.timeline
        ax.plot(np.asarray(tl.t_s) / 60, tl.clock_mhz, label=name, linewidth=1,
                linestyle=styles[name])
    ax.set(xlabel=time_axis, ylabel="SM clock, busy-time weighted (MHz)",
           title=f"SM clock over time ({note})")
    ax.legend(fontsize=8)
    save(fig, "clock.png")

    for key, label, fname in (("tbt_ms", "mean TBT per request (ms)", "tbt.png"),
                              ("e2e_ms", "end-to-end latency (ms)", "e2e.png")):
        fig, ax = plt.subplots(figsize=(8, 4))
        for name, run in runs.items():
            values = np.sort(np.asarray(getattr(run, key)))
            if values.size == 0 or not math.isfinite(values[-1]):
                continue
            ax.plot(values, np.arange(1, values.size + 1) / values.size, label=name,
                    linewidth=1, linestyle=styles[name])
        ax.set(xlabel=label, ylabel="fraction of requests", title=f"CDF of {label} ({note})")
        if key == "e2e_ms":
            ax.set_xscale("log")
        ax.legend(fontsize=8)
        save(fig, fname)
    return written
