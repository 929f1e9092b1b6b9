"""The offline profiler of the twin: one table row per iteration, over a setup's state space.

As the throttLL'eM paper's offline stage does, it sweeps batch size 1…max batch and KV-cache
fill empty…full, plus some prefill iterations, each at a randomly drawn supported SM clock,
and logs the iteration's time, energy, power and the clock the GPU actually ran at.

The twin is a simulation whose clocks may be set: its SM clock is locked to the drawn clock on
every GPU of the setup. Under the power cap it lowers its own clock, exactly as a real card
does, so a row's ``sm_clock_mhz`` (observed) can be below its ``requested_clock_mhz``. The
twin is a deterministic formula; to keep the model from fitting a noiseless formula, each
iteration's time gets multiplicative log-normal noise ``exp(N(0, σ²))`` with σ =
`TWIN_NOISE_SIGMA` (1%, about the 10–90% spread of repeated real H100 iterations, 0.3–1% in
the measured table, widened for run-to-run jitter); energy gets the same factor (power is
unchanged). The noise is drawn from the same seeded generator as the sweep, so a (setup,
samples, seed) triple always gives the same table. A real GPU is profiled by the GPU lab
(`throttllem._gpulab.decoder`, `throttllem profile --target gpu`) into the same layout.

Sweep (twin), per row, from `numpy.random.default_rng(seed)`:

* kind: 70% decode, 15% prefill, 15% mixed (a decode batch plus prefilled prompts, as inflight
  batching runs when it admits requests);
* decode batch: half uniform on 1…max_batch, half log-uniform (small batches are common and
  change fastest);
* KV fill: uniform on [0, 1] of what the batch can hold, min(KV capacity, batch × context
  window) tokens; equal contexts per sequence (the model only sees the sum);
* prefill: prompts admitted the way the engine admits them (first-come first-served until
  the next one would overflow the iteration's token budget, `max_batched_tokens` minus the
  decode batch; the first may exceed it, as in the engine; or the queue runs dry, p = 0.35
  after each prompt), lengths log-normal around 1,020 tokens (σ 0.75: shaped like the Azure
  conversation trace's prompts, median 1,020, p99 ≈ 4,100), clipped to 16…context window;
  or, 30% of the time, one prompt of log-uniform length 16…context window, to cover short
  and very long prompts. Why it matters: prefill attention costs Σ prompt² tokens², which
  the performance model cannot see (it only gets the prefill token count), so the mix of
  prompt lengths behind a given token count must look like serving, or the model learns the
  wrong average (one 8k prompt costs ~8× the attention of eight 1k prompts);
* clock: uniform over the GPU's supported clocks.

Rows of prefilled prompts of different lengths record ``ctx`` = ``tokens`` = their mean
length (rounded) and the exact total in ``prefill_tokens``.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Final, NamedTuple, TextIO

import numpy as np

from throttllem._errors import ConfigError
from throttllem._perf.table import ProfileRow, TableWriter, refuse_parquet

TWIN_NOISE_SIGMA: Final = 0.01
DEFAULT_SAMPLES: Final = 12_000
DEFAULT_SEED: Final = 0
_KIND_P: Final = (0.70, 0.15, 0.15)  # decode, prefill, mixed
PROMPT_MEDIAN_TOKENS: Final = 1020.0
PROMPT_SIGMA: Final = 0.75
_QUEUE_DRY_P: Final = 0.35
_SINGLE_PROMPT_P: Final = 0.30


class SweepPoint(NamedTuple):
    """One planned iteration: its shape and the clock to lock (twin) or expect (gpu)."""

    phase: str  # decode | prefill | mixed
    batch: int  # decode sequences (0 for prefill)
    ctx: int  # KV tokens per decoding sequence
    prompt_lens: tuple[int, ...]  # prompts prefilled in the pass
    clock_mhz: int

    @property
    def kv_tokens(self) -> int:
        return self.batch * self.ctx if self.phase != "prefill" else 0

    @property
    def prefill_tokens(self) -> int:
        return sum(self.prompt_lens)

    @property
    def prefill_attn_tokens2(self) -> int:
        return sum(n * n for n in self.prompt_lens)

    @property
    def decode_batch(self) -> int:
        return 0 if self.phase == "prefill" else self.batch


class SetupLimits(NamedTuple):
    """What bounds the sweep: the engine's limits and the GPU's clocks."""

    max_batch: int
    kv_capacity_tokens: int
    max_model_len: int
    max_batched_tokens: int
    clocks_mhz: tuple[int, ...]


def twin_sweep_plan(limits: SetupLimits, samples: int, seed: int) -> list[SweepPoint]:
    """The twin sweep (module docstring), a pure function of its arguments."""
    if samples < 1:
        raise ConfigError(f"--samples must be at least 1, got {samples}")
    rng = np.random.default_rng(seed)
    kinds = rng.choice(3, size=samples, p=_KIND_P)
    clocks = rng.choice(np.asarray(limits.clocks_mhz), size=samples)
    out: list[SweepPoint] = []
    for kind, clock in zip(kinds.tolist(), clocks.tolist(), strict=True):
        if kind == 1:
            lens = _prompts(rng, limits, budget=limits.max_batched_tokens,
                            kv_free=limits.kv_capacity_tokens)
            out.append(SweepPoint("prefill", 0, 0, lens, int(clock)))
            continue
        b = _batch(rng, limits.max_batch)
        kv_max = min(limits.kv_capacity_tokens, b * (limits.max_model_len - 1))
        ctx = max(1, math.floor(rng.uniform(0.0, 1.0) * kv_max / b))
        if kind == 0:
            out.append(SweepPoint("decode", b, ctx, (), int(clock)))
            continue
        budget = limits.max_batched_tokens - b
        kv_free = limits.kv_capacity_tokens - b * ctx
        if budget < 16 or kv_free < 16:  # no room for a prefill: keep it a decode row
            out.append(SweepPoint("decode", b, ctx, (), int(clock)))
            continue
        lens = _prompts(rng, limits, budget=budget, kv_free=kv_free)
        out.append(SweepPoint("mixed", b, ctx, lens, int(clock)))
    return out


def _batch(rng: np.random.Generator, max_batch: int) -> int:
    if rng.uniform() < 0.5:
        return int(rng.integers(1, max_batch + 1))
    return int(min(max_batch, max(1, round(math.exp(rng.uniform(0.0, math.log(max_batch)))))))


def _prompts(rng: np.random.Generator, limits: SetupLimits, *, budget: int,
             kv_free: int) -> tuple[int, ...]:
    """Prompt lengths prefilled in one pass, admitted as the engine admits them."""
    longest = max(16, min(limits.max_model_len - 1, kv_free))
    if rng.uniform() < _SINGLE_PROMPT_P:
        return (round(math.exp(rng.uniform(math.log(16), math.log(longest)))),)
    lens: list[int] = []
    total = 0
    while True:
        n = int(np.clip(round(PROMPT_MEDIAN_TOKENS * math.exp(rng.normal(0.0, PROMPT_SIGMA))),
                        16, longest))
        if lens and (total + n > budget or total + n > kv_free):
            break
        lens.append(n)
        total += n
        if total >= min(budget, kv_free) or rng.uniform() < _QUEUE_DRY_P:
            break
    return tuple(lens)


def limits_of(setup: str | Path) -> SetupLimits:
    """The sweep bounds of a setup (by name or path)."""
    from throttllem._setup import load_setup  # noqa: PLC0415

    p = load_setup(setup)
    return SetupLimits(max_batch=p.engine.max_batch,
                       kv_capacity_tokens=p.engine.kv_blocks * p.engine.block_tokens,
                       max_model_len=p.model.max_model_len,
                       max_batched_tokens=p.engine.max_batched_tokens,
                       clocks_mhz=p.gpu.supported_clocks_mhz)


def profile_twin(setup: str | Path, *, samples: int = DEFAULT_SAMPLES, seed: int = DEFAULT_SEED,
                 noise_sigma: float = TWIN_NOISE_SIGMA) -> Iterator[ProfileRow]:
    """Run the twin sweep and yield one row per iteration (see the module docstring)."""
    from throttllem._twin.gpu import GpuTwin  # noqa: PLC0415
    from throttllem._twin.profile import load_profile  # noqa: PLC0415

    if not noise_sigma >= 0:
        raise ConfigError(f"noise sigma must be >= 0, got {noise_sigma}")
    profile = load_profile(setup)
    limits = limits_of(setup)
    plan = twin_sweep_plan(limits, samples, seed)
    # Noise from its own stream of the same seed, so the plan does not depend on sigma.
    noise = np.exp(np.random.default_rng([seed, 1]).normal(0.0, noise_sigma, size=len(plan)))
    gpu = GpuTwin(profile, switch_latency_s=0.0)  # a profiler waits for each lock to settle
    n_gpus = gpu.gpu_count()
    block = profile.engine.block_tokens
    kv_bytes = profile.model.kv_bytes_per_token
    now = 0.0
    last_clock: int | None = None
    for point, factor in zip(plan, noise.tolist(), strict=True):
        if point.clock_mhz != last_clock:
            for i in range(n_gpus):
                gpu.set_locked_clocks(i, point.clock_mhz, point.clock_mhz)
            last_clock = point.clock_mhz
        res = gpu.run_iteration(now, batch=point.decode_batch, kv_tokens=point.kv_tokens,
                                prefill_tokens=point.prefill_tokens,
                                prefill_attn_tokens2=float(point.prefill_attn_tokens2))
        now += res.duration_s
        ms = res.duration_s * 1e3 * factor
        kv_tok = point.kv_tokens + point.prefill_tokens
        prompt_blocks = sum(-(-(n + 1) // block) for n in point.prompt_lens)
        if point.phase == "prefill":
            blocks = prompt_blocks
            n_prompts = len(point.prompt_lens)
            batch, ctx = n_prompts, round(point.prefill_tokens / n_prompts)
            tokens = ctx
        else:
            blocks = point.batch * -(-point.ctx // block) + prompt_blocks
            batch, ctx, tokens = point.batch, point.ctx, 1
        yield ProfileRow(
            phase=point.phase, batch=batch, ctx=ctx, tokens=tokens, iter_ms=ms,
            iter_ms_p10=ms, iter_ms_p90=ms,  # one iteration per row: no spread
            energy_j_per_iter=res.energy_mj / 1e3 * factor, avg_power_w=res.power_w,
            sm_clock_mhz=res.clock_mhz, kv_gib=kv_tok * kv_bytes / 2**30,
            requested_clock_mhz=float(point.clock_mhz), prefill_tokens=point.prefill_tokens,
            kv_tokens=point.kv_tokens, kv_blocks=blocks, target="twin", clock_locked=True,
            prefill_attn_tokens2=point.prefill_attn_tokens2)


def run_profile(*, setup: str, out: str | Path, samples: int = DEFAULT_SAMPLES,
                seed: int = DEFAULT_SEED, noise_sigma: float = TWIN_NOISE_SIGMA,
                log: TextIO | None = None) -> int:
    """`throttllem profile --target twin`: write the twin's table to `out`; returns the rows
    written."""
    log = sys.stderr if log is None else log
    refuse_parquet(out, "write")
    t0 = time.perf_counter()
    with TableWriter(out) as w:
        for row in profile_twin(setup, samples=samples, seed=seed, noise_sigma=noise_sigma):
            w.write(row)
    print(f"profile: {w.rows} twin iterations of {setup} (seed {seed}, noise "
          f"sigma {noise_sigma:.3g}) -> {out} in {time.perf_counter() - t0:.1f} s", file=log)
    return w.rows
