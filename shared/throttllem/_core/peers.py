"""Published peers' clock rules, as the controller's clock rules `agft` and `voltana`.

Each is a pure state machine per engine instance: engine passes in (`observe`), a clock out
(`decide`), the current time passed in, no I/O. The controller (`_core/controller.py`) runs
them like its own rules, so they serve live (`throttllem run forecaster --policy agft`) and in
`throttllem evaluate` on the very same requests as ours. Both take what they see from
`engine.iteration` events, as our reactive governor does: neither uses length predictions.

**AGFT** (Ye, Zhang, Tang, arXiv 2508.01744; code github.com/SusCom-Lab/AGFT): an online
contextual bandit (disjoint LinUCB, one linear model per clock) that picks the SM clock every
sampling window from workload features, rewarded by the window's energy-delay product (EDP =
energy × mean time per output token) relative to a baseline measured unlocked:
reward = 2·(1 − min(2, EDP / (0.9 · mean baseline EDP))). As in its code: the exploration
weight α = max(10·e^(−0.02·round), 0.1), ridge 5·I, each clock tried once first, a clock
whose mean reward is ≤ −1.2 after 3 tries within the first 60 rounds pruned, a window whose
mean time per token breaks the TPOT limit prunes that clock and every clock below it (its SLO
boundary), the GPU's lowest clock while idle. Where it deviates, and why:
- features: queue present, prompt and generated tokens per window, tokens per pass, running
  batch, KV-cache use (its own seven less the prefix-cache hit rate: the engines here have no
  prefix cache), read from `engine.iteration` instead of vLLM's Prometheus counters, plus a
  constant feature (with z-scored features alone an arm's estimate is zero at the average
  context, so it cannot learn that one clock is better on the whole);
- the window's energy is its passes' energy (the controller sees engine passes, not the GPU's
  counter), so idle gaps inside a window are not charged; mean time per output token is the
  mean pass time of passes that decode;
- the arms are the supported clocks from our clock floor to the top clock in steps of 90 MHz
  (its code samples coarse then refines around the best clock in 15 MHz steps; its
  statistical periodic pruning and refinement are left out);
- its TPOT limit is the tightest mean-TBT bound of the SLO classes served (its config: 0.8 s,
  far looser), which can only help it meet our SLOs;
- one bandit per instance (its code tunes one GPU).

**VoltanaLLM** (Yu, Taneja, Lin, Zhang, arXiv 2509.04827; code
github.com/Supercomputing-System-AI-Lab/VoltanaLLM, `freq_manager.py`): EcoFreq, a feedback
frequency controller. Every interval it takes the median batch size and median running
tokens of the passes since the last decision, and picks the lowest clock of its frequency list
whose predicted pass latency (an offline lookup table) fits the inter-token SLO; the top clock
when requests wait in the queue or none fits; the lowest clock after 5 s without passes.
Where it deviates, and why:
- it runs on prefill/decode-disaggregated instances (a prefill rule on TTFT, a decode rule on
  ITL) with a state-space router (EcoRoute); our setups colocate prefill and decode, so every
  instance runs the decode rule (with its waiting-queue rule, which covers queued prefills),
  and admission is join-the-shortest-queue (EcoRoute needs the P/D split);
- the latency lookup table is our performance model (the same one our controller uses);
- the frequency list is {the setup's clock floor, the top clock} (its demo on A100: 1005 and
  1410 MHz, a low clock and the card's top); the interval is the controller tick (its code
  loops per scheduler iteration); the rps/tps overrides are off (its demo sets them at 1e6 and
  1e8, i.e. off); the SLO margin is 0 (our bound as is).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from throttllem._core.perf import PerfModel

FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True, slots=True)
class PassSeen:
    """What the clock rules read from one `engine.iteration`."""

    end_s: float
    duration_ms: float
    batch_size: int
    decode_tokens: int
    prefill_tokens: int
    kv_tokens: int
    kv_fraction: float  # KV blocks used / total
    queue_len: int
    energy_mj: float


# --------------------------------------------------------------------------- AGFT


@dataclass(frozen=True, slots=True)
class AgftConfig:
    """AGFT's knobs (values from its code's `config/config.yaml` unless said otherwise)."""

    # Seconds per decision: its metrics sampling window.
    period_s: float = 0.8
    # Distance between arms, in supported clock steps (6 × 15 MHz = 90 MHz; see module doc).
    arm_step: int = 6
    initial_alpha: float = 10.0
    alpha_decay: float = 0.02
    min_alpha: float = 0.1
    ridge: float = 5.0  # its arm init: max(lambda_reg, 5) · I
    baseline_windows: int = 10
    baseline_factor: float = 0.9
    extreme_reward: float = -1.2
    extreme_min_samples: int = 3
    extreme_max_rounds: int = 60


_AGFT_FEATURES = 7  # six workload features and a constant


@dataclass(slots=True)
class _Welford:
    n: int = 0
    mean: FloatArray = field(default_factory=lambda: np.zeros(_AGFT_FEATURES - 1))
    m2: FloatArray = field(default_factory=lambda: np.zeros(_AGFT_FEATURES - 1))

    def normalize(self, x: FloatArray) -> FloatArray:
        self.n += 1
        delta = x - self.mean
        self.mean = self.mean + delta / self.n
        self.m2 = self.m2 + delta * (x - self.mean)
        std = np.sqrt(self.m2 / (self.n - 1)) if self.n > 1 else np.ones_like(x)
        return np.asarray(np.clip((x - self.mean) / (std + 1e-8), -3.0, 3.0), dtype=np.float64)


class AgftBandit:
    """AGFT on one instance: call `observe` for each pass and `decide` every tick; `decide`
    returns the clock to lock (None: leave the GPU at its default clock, while the baseline
    is measured) or `keep` when the period has not elapsed."""

    def __init__(self, config: AgftConfig, clocks: Sequence[int], floor_mhz: int) -> None:
        top = clocks[-1]
        usable = [c for c in clocks if c >= floor_mhz]
        arms = usable[::config.arm_step]
        if arms[-1] != top:
            arms.append(top)
        self.config = config
        self.arms: list[int] = arms
        self.idle_mhz = clocks[0]
        self.a_inv = {c: np.eye(_AGFT_FEATURES) / config.ridge for c in arms}
        self.b = {c: np.zeros(_AGFT_FEATURES) for c in arms}
        self.counts = dict.fromkeys(arms, 0)
        self.reward_sum = dict.fromkeys(arms, 0.0)
        self.pruned: set[int] = set()
        self.boundary_mhz = 0  # SLO boundary: clocks at or below it are out
        self.rounds = 0
        self.baseline: list[float] = []
        self.baseline_edp: float | None = None
        self._norm = _Welford()
        self._window: list[PassSeen] = []
        self._last_s = -math.inf
        self._chosen: int | None = None  # the arm in effect over the current window
        self._context: FloatArray | None = None

    def observe(self, seen: PassSeen) -> None:
        self._window.append(seen)

    def due(self, now_s: float) -> bool:
        return now_s - self._last_s >= self.config.period_s - 1e-9  # float noise of sums

    def decide(self, now_s: float, tpot_limit_ms: float) -> int | None:
        """The clock for the next window (call when `due`)."""
        cfg = self.config
        window, self._window = self._window, []
        self._last_s = now_s
        decoding = [p for p in window if p.decode_tokens > 0]
        if not decoding:  # idle: its idle frequency
            self._chosen, self._context = None, None
            return self.idle_mhz
        tpot_s = sum(p.duration_ms for p in decoding) / len(decoding) / 1e3
        edp = sum(p.energy_mj for p in window) / 1e3 * tpot_s
        context = self._features(window)
        if self.baseline_edp is None:  # measure the baseline unlocked
            self.baseline.append(edp)
            if len(self.baseline) >= cfg.baseline_windows:
                self.baseline_edp = cfg.baseline_factor * float(np.mean(self.baseline))
            self._context = context
            return None if self.baseline_edp is None else self._select(context)
        if self._chosen is not None and self._context is not None:
            if tpot_s * 1e3 > tpot_limit_ms:
                self.boundary_mhz = max(self.boundary_mhz, self._chosen)
            # a baseline of no energy gives no ratio: a neutral reward, as in its code
            reward = (2.0 * (1.0 - min(2.0, edp / self.baseline_edp))
                      if self.baseline_edp > 0 else 0.0)
            self._update(self._chosen, self._context, reward)
        return self._select(context)

    def _features(self, window: list[PassSeen]) -> FloatArray:
        last = window[-1]
        tokens = [p.decode_tokens + p.prefill_tokens for p in window]
        raw = np.asarray([
            1.0 if last.queue_len > 0 else 0.0,
            float(sum(p.prefill_tokens for p in window)),
            float(sum(p.decode_tokens for p in window)),
            sum(tokens) / len(tokens),
            float(last.batch_size),
            100.0 * last.kv_fraction,
        ], dtype=np.float64)
        return np.append(self._norm.normalize(raw), 1.0)

    def _alpha(self) -> float:
        cfg = self.config
        return max(cfg.initial_alpha * math.exp(-cfg.alpha_decay * self.rounds), cfg.min_alpha)

    def _available(self) -> list[int]:
        arms = [c for c in self.arms if c not in self.pruned and c > self.boundary_mhz]
        return arms or [self.arms[-1]]

    def _select(self, context: FloatArray) -> int:
        self._context = context
        available = self._available()
        untried = [c for c in reversed(available) if self.counts[c] == 0]
        if untried:  # each clock once first (from the top down)
            self._chosen = untried[0]
            return untried[0]
        alpha = self._alpha()
        best, best_score = available[-1], -math.inf
        for c in available:
            a_inv = self.a_inv[c]
            theta = a_inv @ self.b[c]
            score = float(theta @ context + alpha * math.sqrt(float(context @ a_inv @ context)))
            if score > best_score:
                best, best_score = c, score
        self._chosen = best
        return best

    def _update(self, arm: int, context: FloatArray, reward: float) -> None:
        cfg = self.config
        a_inv = self.a_inv[arm]
        ax = a_inv @ context  # Sherman-Morrison: (A + x xᵀ)⁻¹
        self.a_inv[arm] = a_inv - np.outer(ax, ax) / (1.0 + float(context @ ax))
        self.b[arm] = self.b[arm] + reward * context
        self.counts[arm] += 1
        self.reward_sum[arm] += reward
        self.rounds += 1
        n = self.counts[arm]
        if (self.rounds <= cfg.extreme_max_rounds and n >= cfg.extreme_min_samples
                and self.reward_sum[arm] / n <= cfg.extreme_reward and arm != self.arms[-1]):
            self.pruned.add(arm)


# --------------------------------------------------------------------------- VoltanaLLM


@dataclass(frozen=True, slots=True)
class VoltanaConfig:
    """EcoFreq's knobs (its `freq_manager.py` and demo scripts)."""

    # Seconds without passes after which it drops to its lowest frequency.
    idle_reset_s: float = 5.0
    # The ITL SLO is the class's TBT bound × (1 + margin).
    slo_margin: float = 0.0


class VoltanaEcoFreq:
    """EcoFreq on one instance: `observe` each pass, `decide` every tick."""

    def __init__(self, config: VoltanaConfig, freq_list: Sequence[int]) -> None:
        if len(freq_list) < 2:
            raise ValueError("EcoFreq's frequency list needs at least two clocks")
        self.config = config
        self.freqs = sorted(freq_list)
        self._window: list[PassSeen] = []
        self._last_pass_s = -math.inf
        self._started_s: float | None = None

    def observe(self, seen: PassSeen) -> None:
        self._window.append(seen)
        self._last_pass_s = seen.end_s

    def decide(self, now_s: float, perf: PerfModel, itl_slo_ms: float) -> int | None:
        """The clock to lock now; None: keep the current one (no passes to judge by)."""
        if self._started_s is None:
            self._started_s = now_s
        window, self._window = self._window, []
        if not window:
            quiet_since = max(self._last_pass_s, self._started_s)
            if now_s - quiet_since > self.config.idle_reset_s:
                return self.freqs[0]
            return None
        if window[-1].queue_len > 0:
            return self.freqs[-1]
        batch = statistics.median(p.batch_size for p in window)
        tokens = statistics.median(p.kv_tokens for p in window if p.kv_tokens > 0) if any(
            p.kv_tokens > 0 for p in window) else 0.0
        candidates = np.asarray(self.freqs[:-1], dtype=np.float64)
        latency_ms = 1e3 * np.asarray(perf.iteration_time_s(
            np.full_like(candidates, float(batch)), np.full_like(candidates, float(tokens)),
            np.zeros_like(candidates), candidates), dtype=np.float64)
        slo = itl_slo_ms * (1.0 + self.config.slo_margin)
        for clock, ms in zip(self.freqs[:-1], latency_ms.tolist(), strict=True):
            if ms <= slo:
                return clock
        return self.freqs[-1]
