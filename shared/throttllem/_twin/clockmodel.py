"""How long one engine iteration takes, and what it draws, at a given SM clock.

Pure functions of (profile, iteration shape, clock); vectorized with numpy broadcasting, no
state, no clock reading. The stated model (parameters and their sources live in the profile):

Iteration shape: `batch` decode sequences (one token each), `kv_tokens` KV entries read by
decode attention (sum of their contexts), `prefill_tokens` new prompt tokens, and
`prefill_attn_tokens2` = Σ prompt_len² over the prefilled sequences (causal prefill attention
does work ∝ len²; pass 0 to ignore it).

Time (roofline split). With r = f_max/f and m(f) the HBM issue-rate factor
(≈ 1 above `hbm_knee_mhz`, ∝ 1/f well below it: too few SM cycles to keep HBM busy),

    t_weights = weights_ms · m(f)                               memory-bound weight stream
    t_compute = token_ms · (batch + prefill_tokens) · r         GEMM work, scales with 1/f
    t_core    = (t_weights^q + t_compute^q)^(1/q)               smooth roofline max, q fitted
    t         = t_core + kv_ms_per_ktoken · kv_tokens/1000 · m(f)          decode attention (HBM)
                + prefill_attn_ms_per_mtoken2 · prefill_attn_tokens2/1e6 · r   (compute)
                + latency_ms · r                                 latency-bound small kernels

So memory-bound decode (small batch) barely slows when the clock drops, prefill slows ∝ 1/f,
and clock sensitivity grows with batch at short contexts (more GEMM work) and shrinks as
contexts grow (more HBM-bound attention).

Power while busy. With g(f) = (f/f_max)·(V(f)/V_max)², V flat at `voltage_min_ratio`·V_max up
to `voltage_knee_mhz` then rising linearly to V_max (dynamic power ∝ f·V²), and time shares
u_c = (compute + latency + prefill attention)/t, u_kv = decode attention/t:

    P = static_w + kv_w · u_kv + g(f) · (clock_w + compute_w · u_c)

`kv_w` is the HBM traffic power of decode attention, which does not depend on the SM clock;
the SM clock tree (`clock_w`) and tensor work (`compute_w`) do. Memory-bound decode thus draws
far under the cap and sheds most of its clock-dependent power when the clock is locked lower.

Power cap: when P at the requested clock exceeds the cap the card lowers its own clock, so
`effective_clock_mhz` is the highest supported clock ≤ requested whose P ≤ cap (the lowest
supported clock when none is).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import numpy.typing as npt

from throttllem._core.perf import AnyArray, FunctionPerfModel, PerfModel
from throttllem._twin.profile import SetupProfile

FloatArray = npt.NDArray[np.float64]


class Breakdown(NamedTuple):
    """One iteration's time and the shares that drive its power (arrays, broadcast shape)."""

    time_s: FloatArray
    compute_share: FloatArray
    kv_share: FloatArray
    hbm_share: FloatArray


def _f64(x: npt.ArrayLike) -> FloatArray:
    return np.asarray(x, dtype=np.float64)


def hbm_factor(profile: SetupProfile, clock_mhz: npt.ArrayLike) -> FloatArray:
    """m(f): slowdown of HBM-bound work at clock f, 1 at the top clock."""
    t = profile.time
    k = t.hbm_knee_sharpness
    f = _f64(clock_mhz)
    top = (1.0 + (t.hbm_knee_mhz / profile.gpu.clock_max_mhz) ** k) ** (1.0 / k)
    return np.asarray((1.0 + (t.hbm_knee_mhz / f) ** k) ** (1.0 / k) / top, dtype=np.float64)


def dynamic_factor(profile: SetupProfile, clock_mhz: npt.ArrayLike) -> FloatArray:
    """g(f) = (f/f_max)·(V(f)/V_max)²: how dynamic power scales with the SM clock."""
    p = profile.power
    fmax = float(profile.gpu.clock_max_mhz)
    f = _f64(clock_mhz)
    rise = np.clip((f - p.voltage_knee_mhz) / (fmax - p.voltage_knee_mhz), 0.0, 1.0)
    v = p.voltage_min_ratio + (1.0 - p.voltage_min_ratio) * rise
    return np.asarray(f / fmax * v * v, dtype=np.float64)


def breakdown(profile: SetupProfile, *, batch: npt.ArrayLike, kv_tokens: npt.ArrayLike,
              prefill_tokens: npt.ArrayLike, clock_mhz: npt.ArrayLike,
              prefill_attn_tokens2: npt.ArrayLike = 0.0) -> Breakdown:
    """Iteration time and activity shares (see the module docstring for the formulas)."""
    tm = profile.time
    f = _f64(clock_mhz)
    if np.any(f <= 0):
        raise ValueError("clock_mhz must be positive")
    r = profile.gpu.clock_max_mhz / f
    m = hbm_factor(profile, f)
    q = tm.roofline_sharpness
    t_weights = tm.weights_ms * m
    t_compute = tm.token_ms * (_f64(batch) + _f64(prefill_tokens)) * r
    t_core = (t_weights**q + t_compute**q) ** (1.0 / q)
    t_kv = tm.kv_ms_per_ktoken * _f64(kv_tokens) / 1e3 * m
    t_clocked = (tm.prefill_attn_ms_per_mtoken2 * _f64(prefill_attn_tokens2) / 1e6
                 + tm.latency_ms) * r
    total_ms = t_core + t_kv + t_clocked
    return Breakdown(
        time_s=np.asarray(total_ms / 1e3, dtype=np.float64),
        compute_share=np.asarray(np.minimum((t_compute + t_clocked) / total_ms, 1.0),
                                 dtype=np.float64),
        kv_share=np.asarray(t_kv / total_ms, dtype=np.float64),
        hbm_share=np.asarray(np.minimum((t_weights + t_kv) / total_ms, 1.0), dtype=np.float64),
    )


def iteration_time_s(profile: SetupProfile, *, batch: npt.ArrayLike, kv_tokens: npt.ArrayLike,
                     prefill_tokens: npt.ArrayLike, clock_mhz: npt.ArrayLike,
                     prefill_attn_tokens2: npt.ArrayLike = 0.0) -> FloatArray:
    """Seconds one iteration takes at `clock_mhz` (the clock it actually runs at)."""
    return breakdown(profile, batch=batch, kv_tokens=kv_tokens, prefill_tokens=prefill_tokens,
                     clock_mhz=clock_mhz, prefill_attn_tokens2=prefill_attn_tokens2).time_s


def _power_from(profile: SetupProfile, b: Breakdown, clock_mhz: npt.ArrayLike) -> FloatArray:
    p = profile.power
    activity = p.clock_w + p.compute_w * b.compute_share
    return np.asarray(p.static_w + p.kv_w * b.kv_share
                      + dynamic_factor(profile, clock_mhz) * activity, dtype=np.float64)


def power_w(profile: SetupProfile, *, batch: npt.ArrayLike, kv_tokens: npt.ArrayLike,
            prefill_tokens: npt.ArrayLike, clock_mhz: npt.ArrayLike,
            prefill_attn_tokens2: npt.ArrayLike = 0.0) -> FloatArray:
    """Average board power (W) over one iteration at `clock_mhz`, ignoring the cap."""
    b = breakdown(profile, batch=batch, kv_tokens=kv_tokens, prefill_tokens=prefill_tokens,
                  clock_mhz=clock_mhz, prefill_attn_tokens2=prefill_attn_tokens2)
    return _power_from(profile, b, clock_mhz)


def effective_clock_mhz(profile: SetupProfile, *, batch: npt.ArrayLike,
                        kv_tokens: npt.ArrayLike, prefill_tokens: npt.ArrayLike,
                        requested_clock_mhz: npt.ArrayLike,
                        prefill_attn_tokens2: npt.ArrayLike = 0.0) -> FloatArray:
    """The clock the card runs at: highest supported ≤ requested whose power ≤ the cap."""
    clocks = np.asarray(profile.gpu.supported_clocks_mhz, dtype=np.float64)
    req = _f64(requested_clock_mhz)[..., None]
    pw = power_w(profile, batch=_f64(batch)[..., None], kv_tokens=_f64(kv_tokens)[..., None],
                 prefill_tokens=_f64(prefill_tokens)[..., None], clock_mhz=clocks,
                 prefill_attn_tokens2=_f64(prefill_attn_tokens2)[..., None])
    ok = (clocks <= req) & (pw <= profile.gpu.power_cap_w)
    highest = clocks.size - 1 - np.argmax(ok[..., ::-1], axis=-1)
    chosen = np.where(ok.any(axis=-1), clocks[highest], clocks[0])
    return np.asarray(chosen, dtype=np.float64)


class Estimate(NamedTuple):
    """An iteration at the clock the card settles on (arrays, broadcast shape)."""

    clock_mhz: FloatArray
    time_s: FloatArray
    power_w: FloatArray
    energy_mj: FloatArray


def estimate(profile: SetupProfile, *, batch: npt.ArrayLike, kv_tokens: npt.ArrayLike,
             prefill_tokens: npt.ArrayLike, requested_clock_mhz: npt.ArrayLike,
             prefill_attn_tokens2: npt.ArrayLike = 0.0) -> Estimate:
    """Effective clock, time, power and energy of iterations at a requested clock."""
    f = effective_clock_mhz(profile, batch=batch, kv_tokens=kv_tokens,
                            prefill_tokens=prefill_tokens, requested_clock_mhz=requested_clock_mhz,
                            prefill_attn_tokens2=prefill_attn_tokens2)
    b = breakdown(profile, batch=batch, kv_tokens=kv_tokens, prefill_tokens=prefill_tokens,
                  clock_mhz=f, prefill_attn_tokens2=prefill_attn_tokens2)
    pw = _power_from(profile, b, f)
    return Estimate(clock_mhz=f, time_s=b.time_s, power_w=pw,
                    energy_mj=np.asarray(pw * b.time_s * 1e3, dtype=np.float64))


# --------------------------------------------------------------------------- scalar fast path
# The engine twin evaluates one iteration at a time; numpy's per-call overhead would dominate,
# so the same formulas are written once more on Python floats (tests check they agree).


class ScalarIteration(NamedTuple):
    time_s: float
    power_w: float
    compute_share: float
    hbm_share: float


def iteration_scalar(profile: SetupProfile, *, batch: float, kv_tokens: float,
                     prefill_tokens: float, clock_mhz: float,
                     prefill_attn_tokens2: float = 0.0) -> ScalarIteration:
    """`breakdown` + power for one iteration, on floats (same model, no numpy)."""
    tm = profile.time
    pm = profile.power
    fmax = profile.gpu.clock_max_mhz
    k = tm.hbm_knee_sharpness
    m = ((1.0 + (tm.hbm_knee_mhz / clock_mhz) ** k)
         / (1.0 + (tm.hbm_knee_mhz / fmax) ** k)) ** (1.0 / k)
    r = fmax / clock_mhz
    q = tm.roofline_sharpness
    t_weights = tm.weights_ms * m
    t_compute = tm.token_ms * (batch + prefill_tokens) * r
    t_core = (t_weights**q + t_compute**q) ** (1.0 / q)
    t_kv = tm.kv_ms_per_ktoken * kv_tokens / 1e3 * m
    t_clocked = (tm.prefill_attn_ms_per_mtoken2 * prefill_attn_tokens2 / 1e6 + tm.latency_ms) * r
    total = t_core + t_kv + t_clocked
    u_c = min((t_compute + t_clocked) / total, 1.0)
    rise = min(max((clock_mhz - pm.voltage_knee_mhz) / (fmax - pm.voltage_knee_mhz), 0.0), 1.0)
    v = pm.voltage_min_ratio + (1.0 - pm.voltage_min_ratio) * rise
    g = clock_mhz / fmax * v * v
    power = pm.static_w + pm.kv_w * t_kv / total + g * (pm.clock_w + pm.compute_w * u_c)
    return ScalarIteration(total / 1e3, power, u_c, min((t_weights + t_kv) / total, 1.0))


def effective_clock_scalar(profile: SetupProfile, *, batch: float, kv_tokens: float,
                           prefill_tokens: float, requested_clock_mhz: float,
                           prefill_attn_tokens2: float = 0.0) -> tuple[int, ScalarIteration]:
    """`effective_clock_mhz` for one iteration, plus the iteration at that clock.

    Binary search over the supported clocks: power is non-decreasing in the clock (a
    property the tests check over the whole state space).
    """
    g = profile.gpu
    clocks = g.supported_clocks_mhz

    def at(i: int) -> ScalarIteration:
        return iteration_scalar(profile, batch=batch, kv_tokens=kv_tokens,
                                prefill_tokens=prefill_tokens, clock_mhz=clocks[i],
                                prefill_attn_tokens2=prefill_attn_tokens2)

    top = min(len(clocks) - 1,
              max(0, math.floor((requested_clock_mhz - g.clock_min_mhz) / g.clock_step_mhz)))
    it = at(top)
    if it.power_w <= g.power_cap_w:
        return clocks[top], it
    lo, hi = 0, top - 1  # the answer is in [lo, hi], or clocks[0] when none fits
    best = 0
    best_it: ScalarIteration | None = None
    while lo <= hi:
        mid = (lo + hi) // 2
        cand = at(mid)
        if cand.power_w <= g.power_cap_w:
            best, best_it = mid, cand
            lo = mid + 1
        else:
            hi = mid - 1
    return clocks[best], best_it if best_it is not None else at(0)


class ScalarClockModel:
    """`effective_clock_scalar` for one profile, with what depends only on the clock (the
    HBM-knee factor, the clock ratio, the weights term and its power, the voltage-scaled
    dynamic power factor) computed once per supported clock: the engine twin asks for one
    iteration per pass, so those powers would otherwise be recomputed every pass. The same
    float operations in the same order as `iteration_scalar`, hence the same numbers."""

    def __init__(self, profile: SetupProfile) -> None:
        self.profile = profile
        g = profile.gpu
        self._clocks = g.supported_clocks_mhz
        self._clock_min = g.clock_min_mhz
        self._clock_step = g.clock_step_mhz
        self._cap_w = g.power_cap_w
        # per clock index: (clock, m, r, t_weights, t_weights**q, g)
        self._per_clock: dict[int, tuple[int, float, float, float, float, float]] = {}

    def _at_clock(self, i: int) -> tuple[int, float, float, float, float, float]:
        hit = self._per_clock.get(i)
        if hit is None:
            profile = self.profile
            tm = profile.time
            pm = profile.power
            fmax = profile.gpu.clock_max_mhz
            clock_mhz = self._clocks[i]
            k = tm.hbm_knee_sharpness
            m = ((1.0 + (tm.hbm_knee_mhz / clock_mhz) ** k)
                 / (1.0 + (tm.hbm_knee_mhz / fmax) ** k)) ** (1.0 / k)
            r = fmax / clock_mhz
            t_weights = tm.weights_ms * m
            rise = min(max((clock_mhz - pm.voltage_knee_mhz) / (fmax - pm.voltage_knee_mhz),
                           0.0), 1.0)
            v = pm.voltage_min_ratio + (1.0 - pm.voltage_min_ratio) * rise
            hit = (clock_mhz, m, r, t_weights, t_weights**tm.roofline_sharpness,
                   clock_mhz / fmax * v * v)
            self._per_clock[i] = hit
        return hit

    def iteration(self, i: int, batch: float, kv_tokens: float, prefill_tokens: float,
                  prefill_attn_tokens2: float) -> ScalarIteration:
        """`iteration_scalar` at the `i`-th supported clock."""
        _, m, r, t_weights, t_weights_q, g = self._at_clock(i)
        tm = self.profile.time
        pm = self.profile.power
        q = tm.roofline_sharpness
        t_compute = tm.token_ms * (batch + prefill_tokens) * r
        t_core = (t_weights_q + t_compute**q) ** (1.0 / q)
        t_kv = tm.kv_ms_per_ktoken * kv_tokens / 1e3 * m
        t_clocked = (tm.prefill_attn_ms_per_mtoken2 * prefill_attn_tokens2 / 1e6
                     + tm.latency_ms) * r
        total = t_core + t_kv + t_clocked
        u_c = min((t_compute + t_clocked) / total, 1.0)
        power = pm.static_w + pm.kv_w * t_kv / total + g * (pm.clock_w + pm.compute_w * u_c)
        return ScalarIteration(total / 1e3, power, u_c, min((t_weights + t_kv) / total, 1.0))

    def effective(self, *, batch: float, kv_tokens: float, prefill_tokens: float,
                  requested_clock_mhz: float,
                  prefill_attn_tokens2: float = 0.0) -> tuple[int, ScalarIteration]:
        """`effective_clock_scalar` (the same search, the same answer)."""
        clocks = self._clocks
        top = min(len(clocks) - 1,
                  max(0, math.floor((requested_clock_mhz - self._clock_min) / self._clock_step)))
        it = self.iteration(top, batch, kv_tokens, prefill_tokens, prefill_attn_tokens2)
        cap = self._cap_w
        if it.power_w <= cap:
            return clocks[top], it
        lo, hi = 0, top - 1  # the answer is in [lo, hi], or clocks[0] when none fits
        best = 0
        best_it: ScalarIteration | None = None
        while lo <= hi:
            mid = (lo + hi) // 2
            cand = self.iteration(mid, batch, kv_tokens, prefill_tokens, prefill_attn_tokens2)
            if cand.power_w <= cap:
                best, best_it = mid, cand
                lo = mid + 1
            else:
                hi = mid - 1
        if best_it is None:
            best_it = self.iteration(0, batch, kv_tokens, prefill_tokens, prefill_attn_tokens2)
        return clocks[best], best_it


def efficient_clock_mhz(profile: SetupProfile) -> int:
    """The most energy-efficient supported clock of a typical decode pass (batch 32, 1k-token
    contexts) under the profile's power model: below it a slower pass costs more static
    energy per token than the lower clock saves (the controller's clock floor)."""
    clocks = np.asarray(profile.gpu.supported_clocks_mhz, dtype=np.float64)
    energy = estimate(profile, batch=32, kv_tokens=32 * 1024, prefill_tokens=0,
                      requested_clock_mhz=clocks).energy_mj
    return int(profile.gpu.supported_clocks_mhz[int(np.argmin(energy))])


def oracle_perf_model(profile: SetupProfile) -> PerfModel:
    """The twin's own timing formula as the controller's performance model: an oracle (the
    model the twin runs on), for ablations; the trained ONNX model stands in for it live."""

    def fn(batch: AnyArray, kv_tokens: AnyArray, prefill_tokens: AnyArray,
           clock_mhz: AnyArray) -> AnyArray:
        return iteration_time_s(profile, batch=batch, kv_tokens=kv_tokens,
                                prefill_tokens=prefill_tokens, clock_mhz=clock_mhz)

    return FunctionPerfModel(fn, name=f"twin-oracle:{profile.name}")
