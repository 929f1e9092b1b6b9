"""Request traces for replay and evaluation: the Azure LLM inference traces, streamed.

The 2023 traces (one hour, ~20k rows) fit in memory, but the 2024 week-long traces have
tens of millions of rows and weigh gigabytes, so everything here streams rows with the
`csv` module and stops reading as soon as the requested window is over. Only
`load_window` materialises rows, and only those inside the window, as numpy columns.

Times: `arrival_s` is seconds since the trace's *first data row* (trace time), whatever
window is selected, so a request keeps its arrival time (and `index`, its 0-based data-row
position in the file) no matter which window it was loaded with.

Timestamps are ISO 8601: the 2023 files write `2023-11-16 18:15:46.6805900` (7 fractional
digits, no offset), the 2024 files `2024-05-10 00:00:00.009930+00:00`. Both are read with
`datetime.fromisoformat`, which keeps microseconds (the 7th digit, 100 ns, is dropped).
"""

from __future__ import annotations

import csv
import gzip
import math
import os
import random
from array import array
from collections import deque
from collections.abc import Generator, Iterable, Iterator
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import IO, TYPE_CHECKING, Final

import msgspec
import numpy as np
import structlog
from numpy.typing import ArrayLike, NDArray

from throttllem._data import data_dir
from throttllem._errors import ConfigError, TraceError
from throttllem._events import RequestArrived

if TYPE_CHECKING:
    from _csv import Reader as CsvReader

__all__ = [
    "TRACE_NAMES",
    "TraceRequest",
    "TraceStream",
    "TraceWindow",
    "iter_trace",
    "load_window",
    "peak_rate_per_s",
    "rate_factor_for_peak",
    "resolve_trace",
    "scale_arrivals",
    "scale_requests",
    "stream_peak_rate_per_s",
    "stream_rate_factor_for_peak",
]

_log = structlog.get_logger("throttllem.trace")

# Short names for the Azure traces, relative to the data folder. The 2024 week-long files
# (DynamoLLM, HPCA 2025) are hosted outside GitHub and are not shipped with the data; a
# user who downloads them puts them in azure-llm-2024/ (plain or gzipped).
TRACE_NAMES: Final[dict[str, str]] = {
    "conv": "azure-llm-2023/AzureLLMInferenceTrace_conv.csv",
    "code": "azure-llm-2023/AzureLLMInferenceTrace_code.csv",
    "conv-2023": "azure-llm-2023/AzureLLMInferenceTrace_conv.csv",
    "code-2023": "azure-llm-2023/AzureLLMInferenceTrace_code.csv",
    "conv-2024": "azure-llm-2024/AzureLLMInferenceTrace_conv_1week.csv",
    "code-2024": "azure-llm-2024/AzureLLMInferenceTrace_code_1week.csv",
}
_SOURCE_HINT: Final = (
    "the Azure LLM inference traces are published at https://github.com/Azure/AzurePublicDataset "
    "(AzureLLMInferenceDataset2023.md, AzureLLMInferenceDataset2024.md)"
)

_COL_TIMESTAMP: Final = "TIMESTAMP"
_COL_PROMPT: Final = "ContextTokens"
_COL_OUTPUT: Final = "GeneratedTokens"
# How many skipped line numbers to keep for the log line; the count is always exact.
_SKIPPED_LINES_KEPT: Final = 10
# Rows handled per numpy call when computing peaks and scale factors, to bound temporary
# memory on week-long traces (a few float64/int64 temporaries of this length).
_PEAK_CHUNK: Final = 1 << 20


class TraceRequest(msgspec.Struct, frozen=True, gc=False):
    """One request of a trace. `arrival_s` is trace time (since the first data row);
    `index` is the request's 0-based data-row position in the file."""

    arrival_s: float
    prompt_tokens: int
    output_tokens: int
    index: int


# --------------------------------------------------------------------------- files


def resolve_trace(name_or_path: str | os.PathLike[str]) -> Path:
    """The file of a trace: a short name ("conv", "code", "conv-2024", "code-2024") under the
    data folder, or a path. Raises TraceError saying which file was looked for and where."""
    if isinstance(name_or_path, str) and name_or_path in TRACE_NAMES:
        relative = TRACE_NAMES[name_or_path]
        try:
            root = data_dir()
        except ConfigError as e:
            raise TraceError(f"trace {name_or_path!r} ({relative}) not found: {e}") from e
        path = root / relative
        for candidate in (path, path.with_name(path.name + ".gz")):
            if candidate.is_file():
                return candidate
        raise TraceError(
            f"trace {name_or_path!r} not found: looked for {path} (and {path.name}.gz) in the "
            f"data folder {root}; {_SOURCE_HINT}; download the file there or pass its path"
        )
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    what = "is a folder, not a file" if path.is_dir() else "does not exist"
    raise TraceError(
        f"trace file {path} {what} (looked at {path.absolute()}); "
        f"known trace names: {', '.join(TRACE_NAMES)}"
    )


def _open_text(path: Path) -> IO[str]:
    # utf-8-sig drops a byte-order mark some spreadsheet exports put before the header.
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8-sig", newline="")
    return path.open(encoding="utf-8-sig", newline="")


class TraceStream(Iterator[TraceRequest]):
    """Requests of one trace window, read lazily. Also counts the rows it skipped.

    Rows whose token counts are not positive are skipped, counted in `skipped_rows` and
    reported once (log event "trace.rows_skipped") when the stream ends or is closed.
    The file is opened on the first `next()` and closed when the window is over, on
    `close()`, or when the stream is garbage-collected.
    """

    def __init__(self, path: Path, *, start_s: float, duration_s: float | None) -> None:
        self.path = path
        self.start_s = start_s
        self.duration_s = duration_s
        self.rows_read = 0
        self.skipped_rows = 0
        self.skipped_lines: list[int] = []
        self._rows = self._read()

    def __iter__(self) -> TraceStream:
        return self

    def __next__(self) -> TraceRequest:
        return next(self._rows)

    def close(self) -> None:
        """Stop reading and close the file."""
        self._rows.close()

    def __enter__(self) -> TraceStream:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _error(self, line: int, column: str | None, problem: str) -> TraceError:
        where = f"{self.path}, line {line}" + (f", column {column}" if column else "")
        return TraceError(f"{where}: {problem}")

    def _read(self) -> Generator[TraceRequest, None, None]:
        end_s = math.inf if self.duration_s is None else self.start_s + self.duration_s
        try:
            with _open_text(self.path) as f:
                yield from self._parse(csv.reader(f), end_s)
        except (OSError, EOFError, UnicodeDecodeError, csv.Error) as e:
            raise TraceError(f"cannot read trace {self.path}: {e}") from e
        finally:
            if self.skipped_rows:
                _log.warning(
                    "trace.rows_skipped",
                    path=str(self.path),
                    skipped_rows=self.skipped_rows,
                    first_lines=self.skipped_lines,
                    reason="ContextTokens or GeneratedTokens not positive",
                )

    def _parse(self, reader: CsvReader, end_s: float) -> Iterator[TraceRequest]:
        header = next(reader, None)
        if header is None:
            raise TraceError(f"trace {self.path} is empty (no header line)")
        ts_col, prompt_col, output_col = self._columns(header)
        width = max(ts_col, prompt_col, output_col) + 1
        fromiso = datetime.fromisoformat
        origin: datetime | None = None
        last_s = -math.inf
        start_s = self.start_s
        index = -1
        for row in reader:
            if not row:  # blank line
                continue
            index += 1
            self.rows_read += 1
            if len(row) < width:
                raise self._error(
                    reader.line_num, None, f"expected {len(header)} fields, got {len(row)}: {row!r}"
                )
            try:
                at = fromiso(row[ts_col])
            except ValueError:
                raise self._error(
                    reader.line_num, _COL_TIMESTAMP, f"not an ISO 8601 time: {row[ts_col]!r}"
                ) from None
            if origin is None:
                origin = at
            try:
                arrival_s = (at - origin).total_seconds()
            except TypeError:
                raise self._error(
                    reader.line_num,
                    _COL_TIMESTAMP,
                    f"{row[ts_col]!r} mixes times with and without a UTC offset",
                ) from None
            if arrival_s < last_s:
                raise self._error(
                    reader.line_num,
                    _COL_TIMESTAMP,
                    f"{row[ts_col]!r} is earlier than the row before: the trace must be "
                    "sorted by TIMESTAMP",
                )
            last_s = arrival_s
            if arrival_s < start_s:
                continue
            if arrival_s >= end_s:
                return  # sorted: nothing later is in the window, so stop reading
            prompt_tokens = self._tokens(row[prompt_col], reader.line_num, _COL_PROMPT)
            output_tokens = self._tokens(row[output_col], reader.line_num, _COL_OUTPUT)
            if prompt_tokens <= 0 or output_tokens <= 0:
                self.skipped_rows += 1
                if len(self.skipped_lines) < _SKIPPED_LINES_KEPT:
                    self.skipped_lines.append(reader.line_num)
                continue
            yield TraceRequest(arrival_s, prompt_tokens, output_tokens, index)
        if origin is None:
            raise TraceError(f"trace {self.path} has a header but no data rows")

    def _tokens(self, text: str, line: int, column: str) -> int:
        try:
            return int(text)
        except ValueError:
            raise self._error(
                line, column, f"expected a whole number of tokens, got {text!r}"
            ) from None

    def _columns(self, header: list[str]) -> tuple[int, int, int]:
        names = [name.strip().lower() for name in header]
        wanted = (_COL_TIMESTAMP, _COL_PROMPT, _COL_OUTPUT)
        missing = [col for col in wanted if col.lower() not in names]
        if missing:
            raise TraceError(
                f"{self.path}, line 1: header {header!r} lacks column(s) {', '.join(missing)} "
                f"(expected {', '.join(wanted)})"
            )
        ts, prompt, output = (names.index(col.lower()) for col in wanted)
        return ts, prompt, output


def _check_window(start_s: float, duration_s: float | None) -> None:
    if not (math.isfinite(start_s) and start_s >= 0.0):
        raise ConfigError(f"start_s must be a finite number >= 0, got {start_s!r}")
    if duration_s is not None and not (duration_s >= 0.0):
        raise ConfigError(f"duration_s must be >= 0 or None (to the end), got {duration_s!r}")


def iter_trace(
    path: str | os.PathLike[str],
    *,
    start_s: float = 0.0,
    duration_s: float | None = None,
) -> TraceStream:
    """Stream the requests with start_s <= arrival_s < start_s + duration_s (trace time).

    `path` is a file or a short trace name (see `resolve_trace`). Reading stops at the first
    row past the window, so an early window of a week-long file costs only its own rows.
    Errors about the file's existence come at once; format errors (TraceError with line
    number and column) come while iterating.
    """
    _check_window(start_s, duration_s)
    return TraceStream(resolve_trace(path), start_s=start_s, duration_s=duration_s)


# --------------------------------------------------------------------------- windows


@dataclass(frozen=True, slots=True, eq=False)
class TraceWindow:
    """A trace window as columns, for the evaluator. Row i of every array is one request.

    `arrival_s` is trace time divided by `rate_factor` (1.0 unless the window was scaled);
    `start_s`/`duration_s` are the selection in the trace's own (unscaled) time.
    """

    path: Path
    start_s: float
    duration_s: float | None
    arrival_s: NDArray[np.float64]
    prompt_tokens: NDArray[np.int64]
    output_tokens: NDArray[np.int64]
    index: NDArray[np.int64]
    skipped_rows: int = 0
    rate_factor: float = 1.0

    def __len__(self) -> int:
        return int(self.arrival_s.shape[0])

    def requests(self) -> Iterator[TraceRequest]:
        """The rows as TraceRequest tuples (plain Python numbers)."""
        for arrival_s, prompt, output, index in zip(
            self.arrival_s.tolist(),
            self.prompt_tokens.tolist(),
            self.output_tokens.tolist(),
            self.index.tolist(),
            strict=True,
        ):
            yield TraceRequest(arrival_s, prompt, output, index)

    def scale_to_peak(
        self, target_peak_rate_per_s: float, *, window_s: float = 60.0
    ) -> TraceWindow:
        """This window with arrivals scaled so that its peak rate is the target (see
        `scale_arrivals`); the new `rate_factor` includes any earlier scaling."""
        scaled_s, factor = scale_arrivals(
            self.arrival_s, target_peak_rate_per_s=target_peak_rate_per_s, window_s=window_s
        )
        return replace(self, arrival_s=scaled_s, rate_factor=self.rate_factor * factor)


def load_window(
    path: str | os.PathLike[str],
    *,
    start_s: float = 0.0,
    duration_s: float | None = None,
) -> TraceWindow:
    """Read one window of a trace (see `iter_trace`) into numpy columns."""
    arrivals = array("d")
    prompts = array("q")
    outputs = array("q")
    indices = array("q")
    with iter_trace(path, start_s=start_s, duration_s=duration_s) as stream:
        for request in stream:
            arrivals.append(request.arrival_s)
            prompts.append(request.prompt_tokens)
            outputs.append(request.output_tokens)
            indices.append(request.index)
    return TraceWindow(
        path=stream.path,
        start_s=start_s,
        duration_s=duration_s,
        arrival_s=np.frombuffer(arrivals, dtype=np.float64),
        prompt_tokens=np.frombuffer(prompts, dtype=np.int64),
        output_tokens=np.frombuffer(outputs, dtype=np.int64),
        index=np.frombuffer(indices, dtype=np.int64),
        skipped_rows=stream.skipped_rows,
    )


# --------------------------------------------------------------------------- rates
#
# Scaling, as the throttLL'eM paper replays the Azure trace at the peak load the evaluated
# system can sustain: every arrival time is divided by one `rate_factor` (> 1 compresses
# time and raises every rate, < 1 stretches it), keeping order, count and token lengths.
# The peak is measured where the system feels it, in replay time with a fixed window, so
# rate_factor is the largest factor whose busiest `window_s` holds at most
# k = floor(target_peak_rate_per_s × window_s) requests:
#
#     D           = min_i (a[i+k] − a[i])    shortest trace-time span holding k+1 arrivals
#     rate_factor = D / window_s             those k+1 arrivals then span exactly window_s
#
# after which peak_rate_per_s(a / rate_factor, window_s) = k / window_s: the target itself
# when target × window_s is a whole number of requests, else the nearest rate below it
# that a whole count per window can reach. Dividing by `peak / target` instead would keep
# the target only for windows that stretch with time; at a fixed window a stretched
# bursty trace then peaks far above the target (the 2023 code trace scaled to 2 req/s
# peaks at 6.9 req/s per replayed minute).


def _check_rate_window(window_s: float) -> None:
    if not (math.isfinite(window_s) and window_s > 0.0):
        raise ConfigError(f"window_s must be a finite number > 0, got {window_s!r}")


def _sorted_arrivals(arrivals_s: ArrayLike) -> NDArray[np.float64]:
    a = np.asarray(arrivals_s, dtype=np.float64)
    if a.ndim != 1:
        raise ConfigError(f"arrivals_s must be one-dimensional, got shape {a.shape}")
    if not bool(np.all(np.isfinite(a))):
        raise TraceError("arrivals_s contains NaN or infinite times")
    if a.size > 1 and bool(np.any(a[1:] < a[:-1])):
        raise TraceError("arrivals_s must be sorted (non-decreasing)")
    return a


def peak_rate_per_s(arrivals_s: ArrayLike, window_s: float = 60.0) -> float:
    """The highest request rate over any window [t, t + window_s): max count / window_s.

    The busiest half-open window always starts at an arrival, so the maximum is taken over
    the windows starting at each arrival (one `searchsorted` for all of them). Arrivals
    must be sorted. A trace shorter than `window_s` gets count / window_s, not count / span.
    """
    _check_rate_window(window_s)
    a = _sorted_arrivals(arrivals_s)
    peak = 0
    for lo in range(0, a.size, _PEAK_CHUNK):
        starts = a[lo : lo + _PEAK_CHUNK]
        ends = np.searchsorted(a, starts + window_s, side="left")
        counts = ends - np.arange(lo, lo + starts.size)
        peak = max(peak, int(counts.max()))
    return peak / window_s


def stream_peak_rate_per_s(arrivals_s: Iterable[float], window_s: float = 60.0) -> float:
    """`peak_rate_per_s` in one pass over sorted arrivals, holding only one window's worth
    of them: for a week-long trace, `stream_peak_rate_per_s(r.arrival_s for r in stream)`."""
    _check_rate_window(window_s)
    open_starts: deque[float] = deque()
    peak = 0
    last_s = -math.inf
    for arrival_s in arrivals_s:
        if not arrival_s >= last_s:
            raise TraceError("arrivals_s must be sorted (non-decreasing) and not NaN")
        last_s = arrival_s
        # Windows starting at these earlier arrivals end at or before this one: close them.
        while open_starts and open_starts[0] + window_s <= arrival_s:
            peak = max(peak, len(open_starts))
            open_starts.popleft()
        open_starts.append(arrival_s)
    return max(peak, len(open_starts)) / window_s


def _requests_per_window(target_peak_rate_per_s: float, window_s: float) -> int:
    _check_rate_window(window_s)
    if not (math.isfinite(target_peak_rate_per_s) and target_peak_rate_per_s > 0.0):
        raise ConfigError(
            f"target_peak_rate_per_s must be a finite number > 0, got {target_peak_rate_per_s!r}"
        )
    # The tolerance keeps e.g. 0.7 req/s × 60 s (41.99999999999999 in floating point) at 42.
    k = math.floor(target_peak_rate_per_s * window_s * (1.0 + 1e-12))
    if k < 1:
        raise ConfigError(
            f"a peak of {target_peak_rate_per_s} req/s is less than one request per "
            f"{window_s} s window; use a longer window_s"
        )
    return k


def _factor_from_span(span_s: float, n: int, k: int, window_s: float) -> float:
    if n <= k:
        raise TraceError(
            f"the trace has {n} requests: even replayed at once it cannot fill a {window_s} s "
            f"window with the target's {k}; lower the target or use a longer trace"
        )
    if span_s <= 0.0:
        raise TraceError(f"{k + 1} requests share one arrival time: no time scale separates them")
    return span_s / window_s


def rate_factor_for_peak(
    arrivals_s: ArrayLike, *, target_peak_rate_per_s: float, window_s: float = 60.0
) -> float:
    """The largest rate_factor for which `arrivals_s / rate_factor` peaks at no more than
    the target in any `window_s` of replay time (formula in the comment above)."""
    k = _requests_per_window(target_peak_rate_per_s, window_s)
    a = _sorted_arrivals(arrivals_s)
    span_s = math.inf
    for lo in range(0, a.size - k, _PEAK_CHUNK):
        hi = min(lo + _PEAK_CHUNK, a.size - k)
        span_s = min(span_s, float(np.min(a[lo + k : hi + k] - a[lo:hi])))
    return _factor_from_span(span_s, a.size, k, window_s)


def stream_rate_factor_for_peak(
    arrivals_s: Iterable[float], *, target_peak_rate_per_s: float, window_s: float = 60.0
) -> float:
    """`rate_factor_for_peak` in one pass, holding only k+1 arrivals: for week-long traces,
    then replay with `scale_requests(iter_trace(...), rate_factor=...)`."""
    k = _requests_per_window(target_peak_rate_per_s, window_s)
    last: deque[float] = deque(maxlen=k + 1)
    span_s = math.inf
    n = 0
    for arrival_s in arrivals_s:
        if last and not arrival_s >= last[-1]:
            raise TraceError("arrivals_s must be sorted (non-decreasing) and not NaN")
        last.append(arrival_s)
        n += 1
        if n > k:
            span_s = min(span_s, arrival_s - last[0])
    return _factor_from_span(span_s, n, k, window_s)


def scale_arrivals(
    arrivals_s: ArrayLike,
    *,
    target_peak_rate_per_s: float,
    window_s: float = 60.0,
) -> tuple[NDArray[np.float64], float]:
    """Scale a trace so its peak rate in replay time is the target; returns
    (arrivals_s / rate_factor, rate_factor).

    rate_factor = min_i (a[i+k] − a[i]) / window_s with k = floor(target × window_s): the
    fastest replay whose busiest `window_s` holds at most k requests, so the scaled trace's
    `peak_rate_per_s(·, window_s)` is k / window_s, which is the target whenever
    target × window_s is whole. Order, count and the trace's relative burstiness are kept.
    """
    a = _sorted_arrivals(arrivals_s)
    rate_factor = rate_factor_for_peak(
        a, target_peak_rate_per_s=target_peak_rate_per_s, window_s=window_s
    )
    scaled_s = a / rate_factor
    # The k+1 arrivals that set the factor span window_s up to rounding; should rounding
    # pull them inside one window, back off by a few ulps.
    limit = _requests_per_window(target_peak_rate_per_s, window_s) / window_s
    for _ in range(8):
        if peak_rate_per_s(scaled_s, window_s) <= limit:
            break
        rate_factor *= 1.0 - 4 * np.finfo(np.float64).eps
        scaled_s = a / rate_factor
    return scaled_s, rate_factor


def scale_requests(
    requests: Iterable[TraceRequest], *, rate_factor: float
) -> Iterator[TraceRequest]:
    """Streaming `scale_arrivals` with a precomputed rate_factor (from
    `stream_rate_factor_for_peak` over the whole trace, or `scale_arrivals` on a window):
    arrival_s / rate_factor for each request, lazily."""
    if not (math.isfinite(rate_factor) and rate_factor > 0.0):
        raise ConfigError(f"rate_factor must be a finite number > 0, got {rate_factor!r}")
    return (msgspec.structs.replace(r, arrival_s=r.arrival_s / rate_factor) for r in requests)


# --------------------------------------------------------------------------- windows as requests

# Tenants of replayed requests, drawn per request from the window's seed.
TENANTS: Final = ("tenant-a", "tenant-b", "tenant-c")


class WindowSpec(msgspec.Struct, frozen=True, kw_only=True):
    """One trace window as requests: the one spec the demo, the replayer and the evaluator
    share, so that the same options mean the same requests (ids, tenants, timing) in each."""

    trace: str = "conv"
    minutes: float = 2.0
    start_minute: float = 0.0
    seed: int = 0  # tenant mix
    peak_rps: float | None = None  # time-scale the window so its busiest minute has this
    slo_class: str = "standard"  # the class of every request


def window_requests(spec: WindowSpec, *, offset_s: float,
                    run_tag: str = "") -> Iterator[RequestArrived]:
    """The window's requests as arrivals, shifted so the window starts at `offset_s`; ids are
    `<run_tag><trace>-<row>`."""
    rng = random.Random(spec.seed)
    start_s = spec.start_minute * 60.0
    path = resolve_trace(spec.trace)
    rows: Iterable[TraceRequest]
    if spec.peak_rps is None:
        rows = iter_trace(path, start_s=start_s, duration_s=spec.minutes * 60.0)
    else:
        window = load_window(path, start_s=start_s, duration_s=spec.minutes * 60.0)
        if len(window) < 2:
            raise ConfigError("the trace window holds too few requests to time-scale")
        window = window.scale_to_peak(spec.peak_rps)
        start_s = start_s / window.rate_factor
        rows = window.requests()
    for row in rows:
        yield RequestArrived(
            id=f"{run_tag}{spec.trace}-{row.index}",
            arrival_s=offset_s + row.arrival_s - start_s,
            prompt_tokens=row.prompt_tokens,
            max_tokens=max(4096, row.output_tokens),
            tenant=rng.choice(TENANTS),
            true_output_tokens=row.output_tokens,
            slo_class=spec.slo_class,
        )
