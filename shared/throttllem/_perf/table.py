"""Profile tables: one row per measured (or simulated) iteration, as CSV.

The layout of ``../shared/data/gpu-profiles/*.csv`` is first-class: a file with exactly these
columns is a valid table,

    phase,batch,ctx,tokens,iter_ms,iter_ms_p10,iter_ms_p90,energy_j_per_iter,avg_power_w,
    sm_clock_mhz,kv_gib

``phase`` is ``decode`` or ``prefill``; ``batch`` the sequences in the iteration; ``ctx`` the KV
tokens per sequence (decode) or the prompt length (prefill); ``tokens`` the new tokens per
sequence (1 for decode, the prompt length for prefill); ``iter_ms`` the iteration time (median
when the row summarises repeats, p10/p90 its spread); ``energy_j_per_iter`` and ``avg_power_w``
from the NVML energy counter; ``sm_clock_mhz`` the SM clock the GPU was *observed* running at;
``kv_gib`` the KV cache held in the iteration.

Our profiler writes a superset (extra columns are optional when reading, and any other column
is ignored): ``requested_clock_mhz`` (the locked clock asked for; empty when none could be
locked), ``prefill_tokens`` and ``kv_tokens`` (the exact iteration shape, needed for ``mixed``
rows that decode a batch and prefill prompts in one pass), ``kv_blocks`` (paged-KV blocks in
use), ``target`` (``twin`` or ``gpu``), ``clock_locked`` (``true``/``false``) and
``prefill_attn_tokens2`` (Σ L² over the prompts L prefilled in the pass: causal prefill
attention costs that, which the prefill token count alone cannot tell apart when a pass
prefills several prompts).

From rows to performance-model features (`ProfileTable.features`), as the engine reports an
iteration (``EngineIteration``: decode batch, KV tokens of the decoding sequences, prefill
tokens):

=========  =============  ====================  =======================
phase      batch feature  kv_tokens             prefill_tokens
=========  =============  ====================  =======================
decode     batch          batch × ctx           0
prefill    0              0                     batch × tokens
mixed      batch          column ``kv_tokens``  column ``prefill_tokens``
=========  =============  ====================  =======================

Non-empty ``kv_tokens`` / ``prefill_tokens`` cells override the derived values on any row.
The clock feature is ``sm_clock_mhz``, the observed clock (what the GPU actually ran at); a
row whose ``sm_clock_mhz`` is empty falls back to ``requested_clock_mhz``.

Σ prompt² (`ProfileTable.attention_tokens2`): the ``prefill_attn_tokens2`` cell where
given; else only what the row pins down exactly: 0 for decode rows; for a prefill row of
one prompt its length², and batch × tokens² for one in the base layout (``batch`` prompts
of ``tokens`` each); NaN for a mixed row and for a prefill row of several prompts with a
``prefill_tokens`` cell (our profilers round ``tokens`` for uneven prompts).

Errors name the file, the line and the column. Parquet is not supported (pyarrow is not a
dependency of this project): ``.parquet`` paths are refused with a message saying to use CSV.

This module imports nothing beyond numpy and the standard library, so that the GPU lab's
profiler (`throttllem._gpulab.decoder`) can write through it on a bare GPU machine.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import TracebackType
from typing import IO, TYPE_CHECKING, Final, NamedTuple

import numpy as np
import numpy.typing as npt

from throttllem._errors import ConfigError

if TYPE_CHECKING:
    from _csv import Writer as _CsvWriter

FloatArray = npt.NDArray[np.float64]

BASE_COLUMNS: Final = (
    "phase", "batch", "ctx", "tokens", "iter_ms", "iter_ms_p10", "iter_ms_p90",
    "energy_j_per_iter", "avg_power_w", "sm_clock_mhz", "kv_gib",
)
EXTRA_COLUMNS: Final = (
    "requested_clock_mhz", "prefill_tokens", "kv_tokens", "kv_blocks", "target", "clock_locked",
    "prefill_attn_tokens2",
)
ALL_COLUMNS: Final = BASE_COLUMNS + EXTRA_COLUMNS
PHASES: Final = ("decode", "prefill", "mixed")
# Columns that must hold a number on every row; the others may be empty (read as NaN).
_REQUIRED_NUMBERS: Final = ("batch", "ctx", "tokens", "iter_ms")
_TRUE: Final = frozenset({"true", "1", "yes"})
_FALSE: Final = frozenset({"false", "0", "no"})


def refuse_parquet(path: str | os.PathLike[str], verb: str) -> None:
    """Raise ConfigError for a .parquet path: pyarrow is not a dependency."""
    p = Path(path)
    if p.suffix.lower() in {".parquet", ".pq"}:
        raise ConfigError(
            f"cannot {verb} {p}: Parquet needs pyarrow, which is not a dependency of "
            f"throttLL'eM; profile tables are CSV (use {p.with_suffix('.csv')})")


class ProfileRow(NamedTuple):
    """One iteration row as the profilers write it (units in the column names)."""

    phase: str
    batch: int
    ctx: int
    tokens: int
    iter_ms: float
    iter_ms_p10: float
    iter_ms_p90: float
    energy_j_per_iter: float
    avg_power_w: float
    sm_clock_mhz: float
    kv_gib: float
    requested_clock_mhz: float | None
    prefill_tokens: int
    kv_tokens: int
    kv_blocks: int | None
    target: str
    clock_locked: bool
    prefill_attn_tokens2: int | None = None  # Σ prompt² of the pass; None: not recorded

    def cells(self) -> list[str]:
        """CSV cells in `ALL_COLUMNS` order (None and NaN become empty cells)."""
        out: list[str] = []
        for value in self:
            if value is None or (isinstance(value, float) and not math.isfinite(value)):
                out.append("")
            elif isinstance(value, bool):
                out.append("true" if value else "false")
            elif isinstance(value, float):
                out.append(f"{value:.6g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.6e}")
            else:
                out.append(str(value))
        return out


class TableWriter:
    """Writes profile rows to CSV as they come, flushing each one, so a profiling run that
    dies half-way leaves every row measured so far. Use as a context manager."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        refuse_parquet(path, "write")
        self.path = Path(path)
        self.rows = 0
        self._fh: IO[str] | None = None
        self._csv: _CsvWriter | None = None

    def __enter__(self) -> TableWriter:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = self.path.open("w", newline="", encoding="utf-8")
        except OSError as e:
            raise ConfigError(f"cannot write profile table {self.path}: {e}") from e
        self._csv = csv.writer(self._fh, lineterminator="\n")
        self._csv.writerow(ALL_COLUMNS)
        self._fh.flush()
        return self

    def write(self, row: ProfileRow) -> None:
        if self._fh is None or self._csv is None:
            raise RuntimeError("TableWriter is not open (use it as a context manager)")
        self._csv.writerow(row.cells())
        self._fh.flush()
        self.rows += 1

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def write_table(path: str | os.PathLike[str], rows: Iterable[ProfileRow]) -> int:
    """Write rows to a CSV table; returns how many."""
    with TableWriter(path) as w:
        for row in rows:
            w.write(row)
        return w.rows


@dataclass(frozen=True)
class ProfileTable:
    """A loaded table: one numpy column per field (NaN where a cell was empty)."""

    path: str
    phase: tuple[str, ...]
    batch: FloatArray
    ctx: FloatArray
    tokens: FloatArray
    iter_ms: FloatArray
    iter_ms_p10: FloatArray
    iter_ms_p90: FloatArray
    energy_j_per_iter: FloatArray
    avg_power_w: FloatArray
    sm_clock_mhz: FloatArray
    kv_gib: FloatArray
    requested_clock_mhz: FloatArray
    prefill_tokens: FloatArray
    kv_tokens: FloatArray
    kv_blocks: FloatArray
    target: tuple[str, ...]
    clock_locked: tuple[bool | None, ...]
    prefill_attn_tokens2: FloatArray
    lines: tuple[int, ...] = field(default=())

    def __len__(self) -> int:
        return len(self.phase)

    @property
    def iter_s(self) -> FloatArray:
        return np.asarray(self.iter_ms / 1e3, dtype=np.float64)

    def features(self) -> tuple[FloatArray, FloatArray, FloatArray, FloatArray]:
        """(decode batch, KV tokens, prefill tokens, observed SM clock MHz), see the module
        docstring for the mapping."""
        ph = np.asarray(self.phase)
        decode = ph == "decode"
        prefill = ph == "prefill"
        batch = np.where(prefill, 0.0, self.batch)
        kv = np.where(decode, self.batch * self.ctx, 0.0)
        pf = np.where(prefill, self.batch * self.tokens, 0.0)
        kv = np.where(np.isnan(self.kv_tokens), kv, self.kv_tokens)
        pf = np.where(np.isnan(self.prefill_tokens), pf, self.prefill_tokens)
        clock = np.where(np.isnan(self.sm_clock_mhz), self.requested_clock_mhz, self.sm_clock_mhz)
        return (np.asarray(batch, dtype=np.float64), np.asarray(kv, dtype=np.float64),
                np.asarray(pf, dtype=np.float64), np.asarray(clock, dtype=np.float64))

    def attention_tokens2(self) -> FloatArray:
        """Σ prompt² of every row's prefills (module docstring); NaN where the row does not
        pin it down (a mixed row without the ``prefill_attn_tokens2`` cell)."""
        ph = np.asarray(self.phase)
        given_p = ~np.isnan(self.prefill_tokens)
        # a prefill row: one prompt of prefill_tokens (exact), or batch prompts of `tokens`
        # each as the base layout defines them; our profilers round `tokens` for uneven
        # prompts (they write prefill_tokens), so such a row of several prompts is unknown
        one = np.where(given_p, self.prefill_tokens * self.prefill_tokens,
                       self.tokens * self.tokens)
        prefill = np.where(self.batch == 1, one,
                           np.where(given_p, math.nan, self.batch * self.tokens * self.tokens))
        derived = np.where(ph == "decode", 0.0, np.where(ph == "prefill", prefill, math.nan))
        given = self.prefill_attn_tokens2
        return np.asarray(np.where(np.isnan(given), derived, given), dtype=np.float64)

    def subset(self, index: npt.ArrayLike) -> ProfileTable:
        """The rows at `index` (an integer or boolean array), in that order."""
        idx = np.arange(len(self))[np.asarray(index)]
        values: dict[str, object] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "path":
                values[f.name] = v
            elif isinstance(v, np.ndarray):
                values[f.name] = v[idx]
            else:
                seq = tuple(v)
                values[f.name] = tuple(seq[i] for i in idx.tolist()) if seq else ()
        return ProfileTable(**values)  # type: ignore[arg-type]


def concat(tables: Sequence[ProfileTable]) -> ProfileTable:
    """Rows of several tables, one after the other (path: the paths joined by '+')."""
    if not tables:
        raise ConfigError("no profile tables to concatenate")
    if len(tables) == 1:
        return tables[0]
    values: dict[str, object] = {}
    for f in fields(ProfileTable):
        parts = [getattr(t, f.name) for t in tables]
        if f.name == "path":
            values[f.name] = "+".join(parts)
        elif isinstance(parts[0], np.ndarray):
            values[f.name] = np.concatenate(parts)
        else:
            values[f.name] = tuple(x for p in parts for x in p)
    return ProfileTable(**values)  # type: ignore[arg-type]


def read_table(path: str | os.PathLike[str]) -> ProfileTable:
    """Read a profile table (the base layout or our superset); ConfigError names the file,
    line and column of the first problem."""
    refuse_parquet(path, "read")
    p = Path(path)
    try:
        with p.open(newline="", encoding="utf-8-sig") as fh:
            return _parse(csv.reader(fh), str(p))
    except OSError as e:
        raise ConfigError(f"cannot read profile table {p}: {e.strerror or e}") from e
    except (csv.Error, UnicodeDecodeError) as e:
        raise ConfigError(f"profile table {p} is not readable CSV: {e}") from e


def _parse(reader: Iterable[list[str]], where: str) -> ProfileTable:
    it = iter(reader)
    header: list[str] | None = None
    for raw in it:
        if any(c.strip() for c in raw):
            header = [c.strip().lower() for c in raw]
            break
    if header is None:
        raise ConfigError(f"{where}: empty file (no header line)")
    dupes = sorted({c for c in header if header.count(c) > 1 and c})
    if dupes:
        raise ConfigError(f"{where}, line 1: column(s) {', '.join(dupes)} appear twice")
    missing = [c for c in BASE_COLUMNS if c not in header]
    # Energy, power, kv_gib and the percentiles may be absent altogether (NaN).
    hard_missing = [c for c in ("phase", *_REQUIRED_NUMBERS) if c not in header]
    if hard_missing or ("sm_clock_mhz" not in header and "requested_clock_mhz" not in header):
        need = hard_missing + ([] if ("sm_clock_mhz" in header
                                      or "requested_clock_mhz" in header) else ["sm_clock_mhz"])
        raise ConfigError(
            f"{where}, line 1: header lacks column(s) {', '.join(need)}; a profile table has "
            f"the columns {','.join(BASE_COLUMNS)} (missing here: {', '.join(missing)})")
    col: dict[str, int] = {name: header.index(name) for name in ALL_COLUMNS if name in header}
    numeric = [c for c in ALL_COLUMNS if c not in ("phase", "target", "clock_locked")]
    values: dict[str, list[float]] = {c: [] for c in numeric}
    phases: list[str] = []
    targets: list[str] = []
    locked: list[bool | None] = []
    lines: list[int] = []
    line = 1
    for raw_row in it:
        line += 1
        if not any(c.strip() for c in raw_row):
            continue
        row = raw_row
        if len(row) < len(header):
            row = row + [""] * (len(header) - len(row))
        elif len(row) > len(header) and any(c.strip() for c in row[len(header):]):
            raise ConfigError(f"{where}, line {line}: {len(row)} fields but the header has "
                              f"{len(header)}")
        phase = row[col["phase"]].strip().lower()
        if phase not in PHASES:
            raise ConfigError(f"{where}, line {line}, column phase: {row[col['phase']]!r} is "
                              f"not one of {', '.join(PHASES)}")
        phases.append(phase)
        for c in numeric:
            values[c].append(_number(row, col, c, where, line))
        targets.append(row[col["target"]].strip() if "target" in col else "")
        locked.append(_bool(row, col, where, line))
        lines.append(line)
        _check_row(values, phase, where, line)
    if not phases:
        raise ConfigError(f"{where}: a header but no data rows")
    arrays = {c: np.asarray(v, dtype=np.float64) for c, v in values.items()}
    return ProfileTable(path=where, phase=tuple(phases), target=tuple(targets),
                        clock_locked=tuple(locked), lines=tuple(lines), **arrays)


def _number(row: list[str], col: dict[str, int], name: str, where: str, line: int) -> float:
    if name not in col:
        return math.nan
    text = row[col[name]].strip()
    if not text:
        if name in _REQUIRED_NUMBERS:
            raise ConfigError(f"{where}, line {line}, column {name}: empty (a number is needed)")
        return math.nan
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"{where}, line {line}, column {name}: {text!r} is not a "
                          "number") from None
    if math.isinf(value) or (math.isnan(value) and name in _REQUIRED_NUMBERS):
        raise ConfigError(f"{where}, line {line}, column {name}: {text!r} is not finite")
    return value


def _bool(row: list[str], col: dict[str, int], where: str, line: int) -> bool | None:
    if "clock_locked" not in col:
        return None
    text = row[col["clock_locked"]].strip().lower()
    if not text:
        return None
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ConfigError(f"{where}, line {line}, column clock_locked: {text!r} is not true/false")


def _check_row(values: dict[str, list[float]], phase: str, where: str, line: int) -> None:
    def last(name: str) -> float:
        return values[name][-1]

    def bad(name: str, why: str) -> ConfigError:
        return ConfigError(f"{where}, line {line}, column {name}: {last(name)!r} {why}")

    if not last("iter_ms") > 0:
        raise bad("iter_ms", "must be > 0")
    for name in ("batch", "tokens"):
        if not last(name) >= 1:
            raise bad(name, "must be at least 1")
        if last(name) != int(last(name)):
            raise bad(name, "must be a whole number")
    if not last("ctx") >= 0:
        raise bad("ctx", "must be >= 0")
    for name in ("kv_tokens", "prefill_tokens", "kv_blocks", "prefill_attn_tokens2"):
        v = last(name)
        if not math.isnan(v) and v < 0:
            raise bad(name, "must be >= 0")
    a2, pf = last("prefill_attn_tokens2"), last("prefill_tokens")
    if not math.isnan(a2):
        if math.isnan(pf) and phase == "decode":
            pf = 0.0
        elif math.isnan(pf):
            pf = last("batch") * last("tokens")
        # Σ L² ≤ (Σ L)², and a pass that prefills something has Σ L² ≥ 1
        if a2 > pf * pf or (pf > 0 and a2 < 1):
            raise bad("prefill_attn_tokens2", f"is not a sum of squared prompt lengths that "
                      f"add up to {pf:g} prefill tokens")
    clock = last("sm_clock_mhz")
    if math.isnan(clock):
        clock = last("requested_clock_mhz")
        if math.isnan(clock):
            raise ConfigError(f"{where}, line {line}, column sm_clock_mhz: empty, and no "
                              "requested_clock_mhz to fall back on (the clock is a feature)")
    if not clock > 0:
        raise ConfigError(f"{where}, line {line}, column sm_clock_mhz: {clock!r} must be > 0")
    if phase == "mixed" and (math.isnan(last("kv_tokens")) or math.isnan(last("prefill_tokens"))):
        raise ConfigError(f"{where}, line {line}, column phase: a mixed row needs the "
                          "kv_tokens and prefill_tokens columns")
