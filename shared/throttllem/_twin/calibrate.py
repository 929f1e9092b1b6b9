"""Fit the twin's "fitted" profile parameters to the measured H100 table, and score the twin.

The table (`../shared/data/gpu-profiles/h100-sxm-llama3-8b-shape.csv`, read at run time, never
copied) has 51 decode rows (batch 1–384 × context 128–8192) and 8 prefill rows, each with the
SM clock the card actually ran at (prefill and big decode batches hit the 700 W cap and ran
at 1560–1935 MHz). The fit evaluates the model at that observed clock, so the fitted
top-clock parameters are not biased by the throttling.

Fitted here (least squares on relative error): time.weights_ms, time.kv_ms_per_ktoken,
time.token_ms, time.prefill_attn_ms_per_mtoken2, time.roofline_sharpness, power.clock_w,
power.compute_w, power.kv_w. Everything else is held at the profile's stated value.

    python -m throttllem._twin.calibrate [profile]     # prints the fit and the scores
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np

from throttllem._data import data_file
from throttllem._errors import ConfigError
from throttllem._setup import DEFAULT_SETUP
from throttllem._twin import clockmodel
from throttllem._twin.clockmodel import FloatArray
from throttllem._twin.profile import SetupProfile, load_profile

MEASURED_CSV = "gpu-profiles/h100-sxm-llama3-8b-shape.csv"
TIME_FITTED = ("time.weights_ms", "time.kv_ms_per_ktoken", "time.token_ms",
               "time.prefill_attn_ms_per_mtoken2", "time.roofline_sharpness")
POWER_FITTED = ("power.clock_w", "power.compute_w", "power.kv_w")


class MeasuredTable(NamedTuple):
    """The measured rows, already turned into the clock model's iteration shape."""

    phase: tuple[str, ...]
    rows_batch: FloatArray
    rows_ctx: FloatArray
    batch: FloatArray
    kv_tokens: FloatArray
    prefill_tokens: FloatArray
    prefill_attn_tokens2: FloatArray
    clock_mhz: FloatArray
    time_s: FloatArray
    power_w: FloatArray
    energy_mj: FloatArray


def load_measured(path: str | Path | None = None) -> MeasuredTable:
    """Read the measured table; decode rows read b·ctx KV tokens, prefill rows run b·ctx tokens."""
    src = Path(path) if path is not None else data_file(MEASURED_CSV)
    try:
        with src.open(newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
    except OSError as e:
        raise ConfigError(f"cannot read measured table {src}: {e}") from e
    if not rows:
        raise ConfigError(f"measured table {src} is empty")
    try:
        phase = tuple(r["phase"] for r in rows)
        b = np.array([float(r["batch"]) for r in rows])
        ctx = np.array([float(r["ctx"]) for r in rows])
        decode = np.array([p == "decode" for p in phase])
        return MeasuredTable(
            phase=phase, rows_batch=b, rows_ctx=ctx,
            batch=np.where(decode, b, 0.0),
            kv_tokens=np.where(decode, b * ctx, 0.0),
            prefill_tokens=np.where(decode, 0.0, b * ctx),
            prefill_attn_tokens2=np.where(decode, 0.0, b * ctx * ctx),
            clock_mhz=np.array([float(r["sm_clock_mhz"]) for r in rows]),
            time_s=np.array([float(r["iter_ms"]) for r in rows]) / 1e3,
            power_w=np.array([float(r["avg_power_w"]) for r in rows]),
            energy_mj=np.array([float(r["energy_j_per_iter"]) for r in rows]) * 1e3,
        )
    except (KeyError, ValueError) as e:
        raise ConfigError(f"measured table {src} lacks or garbles a column: {e}") from e


class Score(NamedTuple):
    """How far the twin is from the measured table (percent errors over all rows)."""

    rows: int
    time_mape_pct: float
    time_max_pct: float
    power_mape_pct: float
    power_max_pct: float
    energy_mape_pct: float
    energy_max_pct: float
    clock_mae_mhz: float


def predict(profile: SetupProfile, table: MeasuredTable, *,
            clock: str = "observed") -> clockmodel.Estimate:
    """The twin's view of every row: at the measured clock ("observed"), or at the clock the
    twin's own power-cap model picks when the default clock is requested ("predicted")."""
    if clock == "observed":
        f = table.clock_mhz
    elif clock == "predicted":
        f = clockmodel.effective_clock_mhz(
            profile, batch=table.batch, kv_tokens=table.kv_tokens,
            prefill_tokens=table.prefill_tokens, prefill_attn_tokens2=table.prefill_attn_tokens2,
            requested_clock_mhz=profile.gpu.default_clock_mhz)
    else:
        raise ValueError(f"clock must be 'observed' or 'predicted', not {clock!r}")
    b = clockmodel.breakdown(profile, batch=table.batch, kv_tokens=table.kv_tokens,
                             prefill_tokens=table.prefill_tokens, clock_mhz=f,
                             prefill_attn_tokens2=table.prefill_attn_tokens2)
    pw = clockmodel.power_w(profile, batch=table.batch, kv_tokens=table.kv_tokens,
                            prefill_tokens=table.prefill_tokens, clock_mhz=f,
                            prefill_attn_tokens2=table.prefill_attn_tokens2)
    return clockmodel.Estimate(clock_mhz=np.asarray(f, dtype=np.float64), time_s=b.time_s,
                               power_w=pw, energy_mj=pw * b.time_s * 1e3)


def score(profile: SetupProfile, table: MeasuredTable, *, clock: str = "observed") -> Score:
    est = predict(profile, table, clock=clock)

    def pct(model: FloatArray, measured: FloatArray) -> FloatArray:
        return np.asarray(np.abs(model - measured) / measured * 100.0, dtype=np.float64)

    t, p, e = (pct(est.time_s, table.time_s), pct(est.power_w, table.power_w),
               pct(est.energy_mj, table.energy_mj))
    return Score(rows=len(table.phase), time_mape_pct=float(t.mean()), time_max_pct=float(t.max()),
                 power_mape_pct=float(p.mean()), power_max_pct=float(p.max()),
                 energy_mape_pct=float(e.mean()), energy_max_pct=float(e.max()),
                 clock_mae_mhz=float(np.abs(est.clock_mhz - table.clock_mhz).mean()))


def fit(profile: SetupProfile, table: MeasuredTable) -> dict[str, float]:
    """Least-squares values of the fitted parameters, the profile's assumptions held fixed."""
    from scipy.optimize import least_squares, nnls  # type: ignore[import-untyped] # noqa: PLC0415

    def with_time(x: FloatArray) -> SetupProfile:
        return profile.with_overrides(dict(zip(TIME_FITTED, map(float, x), strict=True)))

    def time_residual(x: FloatArray) -> FloatArray:
        t = clockmodel.iteration_time_s(
            with_time(x), batch=table.batch, kv_tokens=table.kv_tokens,
            prefill_tokens=table.prefill_tokens, clock_mhz=table.clock_mhz,
            prefill_attn_tokens2=table.prefill_attn_tokens2)
        return np.asarray(t / table.time_s - 1.0, dtype=np.float64)

    tm = profile.time
    x0 = np.array([tm.weights_ms, tm.kv_ms_per_ktoken, tm.token_ms,
                   tm.prefill_attn_ms_per_mtoken2, tm.roofline_sharpness])
    res = least_squares(time_residual, x0, bounds=([1e-6, 0, 1e-6, 0, 1.0], np.inf),
                        x_scale="jac")
    fitted = with_time(res.x)
    b = clockmodel.breakdown(fitted, batch=table.batch, kv_tokens=table.kv_tokens,
                             prefill_tokens=table.prefill_tokens, clock_mhz=table.clock_mhz,
                             prefill_attn_tokens2=table.prefill_attn_tokens2)
    g = clockmodel.dynamic_factor(fitted, table.clock_mhz)
    design = np.stack([g, g * b.compute_share, b.kv_share], axis=1)
    target = table.power_w - fitted.power.static_w
    coef, _ = nnls(design / table.power_w[:, None], target / table.power_w)
    out = dict(zip(TIME_FITTED, map(float, res.x), strict=True))
    out.update(zip(POWER_FITTED, map(float, coef), strict=True))
    return out


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    profile = load_profile(args[0] if args else DEFAULT_SETUP)
    table = load_measured()
    fitted = fit(profile, table)
    print(f"fit of {profile.name} to {MEASURED_CSV} ({len(table.phase)} rows):")
    for key, value in fitted.items():
        section, _, name = key.partition(".")
        shipped = getattr(getattr(profile, section), name)
        print(f"  {key:36s} fitted {value:12.6g}   profile {shipped:12.6g}")
    for label, prof in (("profile", profile), ("refit", profile.with_overrides(fitted))):
        for clock in ("observed", "predicted"):
            s = score(prof, table, clock=clock)
            print(f"  {label:7s} @ {clock:9s} clock: time MAPE {s.time_mape_pct:5.2f}% "
                  f"(max {s.time_max_pct:5.2f}%)  power {s.power_mape_pct:5.2f}% "
                  f"(max {s.power_max_pct:5.2f}%)  energy {s.energy_mape_pct:5.2f}% "
                  f"(max {s.energy_max_pct:5.2f}%)  clock MAE {s.clock_mae_mhz:5.1f} MHz")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
