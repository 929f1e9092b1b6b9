"""Trace loading (real Azure 2023 files, streamed) and peak-rate scaling."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
from structlog.testing import capture_logs

from throttllem import ConfigError, TraceError
from throttllem._trace import (
    TraceRequest,
    iter_trace,
    load_window,
    peak_rate_per_s,
    rate_factor_for_peak,
    resolve_trace,
    scale_arrivals,
    scale_requests,
    stream_peak_rate_per_s,
    stream_rate_factor_for_peak,
)

HEADER = "TIMESTAMP,ContextTokens,GeneratedTokens\n"


def write_trace(path: Path, rows: list[str], header: str = HEADER) -> Path:
    path.write_text(header + "".join(row + "\n" for row in rows))
    return path


def seconds_rows(times_s: list[float], tokens: tuple[int, int] = (100, 10)) -> list[str]:
    """Rows in the 2023 format at the given seconds after 2023-11-16 18:00:00."""
    rows = []
    for t_s in times_s:
        minutes, seconds = divmod(t_s, 60.0)
        rows.append(f"2023-11-16 18:{int(minutes):02d}:{seconds:010.7f},{tokens[0]},{tokens[1]}")
    return rows


# --------------------------------------------------------------------------- real files


@pytest.mark.parametrize(("name", "rows"), [("conv", 19_366), ("code", 8_819)])
def test_real_azure_2023_traces_load_whole(name: str, rows: int) -> None:
    window = load_window(name)

    assert len(window) == rows
    assert window.skipped_rows == 0
    assert window.arrival_s[0] == 0.0
    assert bool(np.all(np.diff(window.arrival_s) >= 0.0))
    assert window.index.tolist() == list(range(rows))
    assert int(window.prompt_tokens.min()) > 0
    assert int(window.output_tokens.min()) > 0
    # One hour of traffic.
    assert 3_000.0 < float(window.arrival_s[-1]) < 3_600.0


def test_real_conv_first_rows_are_read_exactly() -> None:
    first, second = list(iter_trace("conv", duration_s=5.0))[:2]

    # 18:15:46.6805900 and 18:15:50.9951690 with 374/44 and 396/109 tokens.
    assert first == TraceRequest(0.0, 374, 44, 0)
    assert second.arrival_s == pytest.approx(4.314579, abs=1e-6)
    assert (second.prompt_tokens, second.output_tokens, second.index) == (396, 109, 1)


def test_window_selects_half_open_interval_in_trace_time() -> None:
    whole = load_window("conv")
    window = load_window("conv", start_s=600.0, duration_s=300.0)

    inside = (whole.arrival_s >= 600.0) & (whole.arrival_s < 900.0)
    assert len(window) == int(inside.sum()) > 0
    np.testing.assert_array_equal(window.arrival_s, whole.arrival_s[inside])
    np.testing.assert_array_equal(window.index, whole.index[inside])
    np.testing.assert_array_equal(window.prompt_tokens, whole.prompt_tokens[inside])
    # Requests keep their trace time and file position, whatever the window.
    assert [r.arrival_s for r in window.requests()] == whole.arrival_s[inside].tolist()


def test_empty_windows() -> None:
    assert len(load_window("code", duration_s=0.0)) == 0
    assert list(iter_trace("code", start_s=1e6)) == []


def test_window_arguments_are_checked() -> None:
    with pytest.raises(ConfigError, match="start_s"):
        iter_trace("conv", start_s=-1.0)
    with pytest.raises(ConfigError, match="duration_s"):
        iter_trace("conv", duration_s=-5.0)


# --------------------------------------------------------------------------- streaming


def test_streaming_stops_at_the_first_row_past_the_window(tmp_path: Path) -> None:
    rows = seconds_rows([0.0, 1.0, 2.0, 3.0, 10.0])
    rows += ["garbage", "2023-13-45 99:99:99,abc,", "not,a,trace"]
    path = write_trace(tmp_path / "trace.csv", rows)

    stream = iter_trace(path, duration_s=5.0)
    requests = list(stream)

    assert [r.arrival_s for r in requests] == [0.0, 1.0, 2.0, 3.0]
    assert stream.rows_read == 5  # the four in the window and the one that ended it
    with pytest.raises(TraceError, match="line 7"):
        list(iter_trace(path))


def test_streaming_abandoned_early_closes_the_file(tmp_path: Path) -> None:
    path = write_trace(tmp_path / "trace.csv", seconds_rows([0.0, 1.0, 2.0]))

    with iter_trace(path) as stream:
        assert next(stream).index == 0
    with pytest.raises(StopIteration):
        next(stream)


def test_gzipped_trace_streams(tmp_path: Path) -> None:
    path = tmp_path / "trace.csv.gz"
    with gzip.open(path, "wt") as f:
        f.write(HEADER + "\n".join(seconds_rows([0.0, 0.5, 1.5])) + "\n")

    assert [r.arrival_s for r in iter_trace(path)] == [0.0, 0.5, 1.5]


def test_2024_format_with_utc_offset(tmp_path: Path) -> None:
    path = write_trace(
        tmp_path / "week.csv",
        [
            "2024-05-10 00:00:00.009930+00:00,2162,5",
            "2024-05-10 23:59:59.999930+00:00,100,20",
            "2024-05-11 00:00:01.009930+00:00,300,7",
        ],
    )

    assert [r.arrival_s for r in iter_trace(path)] == pytest.approx([0.0, 86_399.99, 86_401.0])


def test_blank_lines_are_ignored(tmp_path: Path) -> None:
    path = tmp_path / "trace.csv"
    path.write_text(HEADER + "\n".join(seconds_rows([0.0, 1.0])) + "\n\n\n")

    assert len(load_window(path)) == 2


# --------------------------------------------------------------------------- bad rows


def test_non_positive_tokens_are_skipped_counted_and_logged(tmp_path: Path) -> None:
    rows = seconds_rows([0.0, 1.0, 2.0, 3.0])
    rows[1] = rows[1].rsplit(",", 2)[0] + ",0,10"
    rows[3] = rows[3].rsplit(",", 2)[0] + ",100,-3"
    path = write_trace(tmp_path / "trace.csv", rows)

    with capture_logs() as logs:
        stream = iter_trace(path)
        requests = list(stream)
    window = load_window(path)

    assert [r.index for r in requests] == [0, 2]
    assert stream.skipped_rows == 2
    assert stream.skipped_lines == [3, 5]
    assert window.skipped_rows == 2
    assert len(window) == 2
    [event] = [e for e in logs if e["event"] == "trace.rows_skipped"]
    assert event["skipped_rows"] == 2
    assert event["log_level"] == "warning"


@pytest.mark.parametrize(
    ("bad_row", "message"),
    [
        ("2023-11-16 18:00:02.0000000,abc,10", r"line 4, column ContextTokens: .*'abc'"),
        ("2023-11-16 18:00:02.0000000,10,1.5", r"line 4, column GeneratedTokens: .*'1.5'"),
        ("yesterday,10,10", r"line 4, column TIMESTAMP: not an ISO 8601 time: 'yesterday'"),
        ("2023-11-16 18:00:02.0000000,10", r"line 4: expected 3 fields, got 2"),
        ("2023-11-16 17:59:59.0000000,10,10", r"line 4, column TIMESTAMP: .*must be sorted"),
        ("2023-11-16 18:00:02.0000000+00:00,10,10", r"line 4, column TIMESTAMP: .*UTC offset"),
    ],
)
def test_malformed_rows_name_file_line_and_column(
    tmp_path: Path, bad_row: str, message: str
) -> None:
    path = write_trace(tmp_path / "bad.csv", [*seconds_rows([0.0, 1.0]), bad_row])

    with pytest.raises(TraceError, match=message) as info:
        list(iter_trace(path))
    assert str(path) in str(info.value)
    assert isinstance(info.value, ValueError)


def test_header_must_name_the_columns(tmp_path: Path) -> None:
    path = write_trace(tmp_path / "bad.csv", ["2023-11-16 18:00:00,1,1"], header="time,in,out\n")

    with pytest.raises(TraceError, match=r"line 1: .*lacks column\(s\) TIMESTAMP, ContextTokens"):
        list(iter_trace(path))


def test_empty_and_header_only_files(tmp_path: Path) -> None:
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    header_only = write_trace(tmp_path / "header.csv", [])

    with pytest.raises(TraceError, match="empty"):
        list(iter_trace(empty))
    with pytest.raises(TraceError, match="no data rows"):
        load_window(header_only)


# --------------------------------------------------------------------------- resolving


def test_missing_file_says_where_it_looked(tmp_path: Path) -> None:
    missing = tmp_path / "nope.csv"

    with pytest.raises(TraceError, match=r"nope\.csv does not exist") as info:
        iter_trace(missing)
    assert "known trace names: conv, code" in str(info.value)


def test_missing_named_trace_says_which_file_and_where(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("THROTTLLEM_DATA_DIR", str(tmp_path))

    with pytest.raises(TraceError) as info:
        resolve_trace("conv-2024")
    message = str(info.value)
    assert str(tmp_path / "azure-llm-2024" / "AzureLLMInferenceTrace_conv_1week.csv") in message
    assert "AzurePublicDataset" in message


def test_named_2024_trace_is_found_when_downloaded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("THROTTLLEM_DATA_DIR", str(tmp_path))
    folder = tmp_path / "azure-llm-2024"
    folder.mkdir()
    with gzip.open(folder / "AzureLLMInferenceTrace_code_1week.csv.gz", "wt") as f:
        f.write(HEADER + "2024-05-10 00:00:00.009930+00:00,2162,5\n")

    assert [r.prompt_tokens for r in iter_trace("code-2024")] == [2162]


def test_a_folder_is_not_a_trace(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match="is a folder"):
        resolve_trace(tmp_path)


# --------------------------------------------------------------------------- rates


def brute_force_peak_rate_per_s(arrivals_s: np.ndarray, window_s: float) -> float:
    counts = [int(np.sum((arrivals_s >= a) & (arrivals_s < a + window_s))) for a in arrivals_s]
    return max(counts, default=0) / window_s


def test_peak_rate_counts_half_open_windows() -> None:
    arrivals_s = [0.0, 0.5, 1.0, 1.5, 10.0]

    assert peak_rate_per_s(arrivals_s, window_s=1.0) == 2.0
    assert peak_rate_per_s(arrivals_s, window_s=1.0001) == pytest.approx(3 / 1.0001)
    assert peak_rate_per_s([], window_s=60.0) == 0.0
    assert stream_peak_rate_per_s(arrivals_s, window_s=1.0) == 2.0


@pytest.mark.parametrize("seed", range(5))
def test_peak_rate_matches_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    arrivals_s = np.sort(np.round(rng.exponential(1.0, 300).cumsum(), 1))
    for window_s in (0.5, 3.0, 20.0):
        expected = brute_force_peak_rate_per_s(arrivals_s, window_s)
        assert peak_rate_per_s(arrivals_s, window_s) == expected
        assert stream_peak_rate_per_s(arrivals_s.tolist(), window_s) == expected


def test_peak_rate_needs_sorted_arrivals_and_a_window() -> None:
    with pytest.raises(TraceError, match="sorted"):
        peak_rate_per_s([1.0, 0.0])
    with pytest.raises(TraceError, match="sorted"):
        stream_peak_rate_per_s([1.0, 0.0])
    with pytest.raises(ConfigError, match="window_s"):
        peak_rate_per_s([0.0], window_s=0.0)


@pytest.mark.parametrize(("name", "target"), [("conv", 2.0), ("conv", 50.0), ("code", 2.0)])
def test_scaling_makes_the_peak_the_target(name: str, target: float) -> None:
    window = load_window(name)

    scaled_s, factor = scale_arrivals(window.arrival_s, target_peak_rate_per_s=target)

    assert peak_rate_per_s(scaled_s, 60.0) == pytest.approx(target, rel=1e-9)
    assert scaled_s.shape == window.arrival_s.shape
    assert bool(np.all(np.diff(scaled_s) >= 0.0))
    np.testing.assert_allclose(scaled_s * factor, window.arrival_s, rtol=1e-12, atol=1e-9)
    # The fastest such replay: any faster and some window holds one request too many.
    assert peak_rate_per_s(window.arrival_s / (factor * 1.001), 60.0) > target


def test_scaling_to_a_rate_no_whole_count_reaches_stays_just_below() -> None:
    arrivals_s = load_window("conv").arrival_s
    target = 1.234  # 74.04 requests per minute

    scaled_s, _ = scale_arrivals(arrivals_s, target_peak_rate_per_s=target)

    assert peak_rate_per_s(scaled_s, 60.0) == pytest.approx(74 / 60, rel=1e-12)


def test_streaming_factor_matches_and_scales_requests_lazily() -> None:
    window = load_window("conv", duration_s=1_800.0)
    factor = rate_factor_for_peak(window.arrival_s, target_peak_rate_per_s=3.0)

    streamed = stream_rate_factor_for_peak(
        (r.arrival_s for r in iter_trace("conv", duration_s=1_800.0)),
        target_peak_rate_per_s=3.0,
    )
    replay = list(scale_requests(iter_trace("conv", duration_s=1_800.0), rate_factor=factor))

    assert streamed == pytest.approx(factor, rel=1e-12)
    np.testing.assert_allclose([r.arrival_s for r in replay], window.arrival_s / factor)
    assert [r.index for r in replay] == window.index.tolist()


def test_window_scale_to_peak_records_the_factor() -> None:
    window = load_window("code", duration_s=600.0)

    scaled = window.scale_to_peak(5.0)

    assert peak_rate_per_s(scaled.arrival_s, 60.0) == pytest.approx(5.0, rel=1e-9)
    np.testing.assert_allclose(scaled.arrival_s * scaled.rate_factor, window.arrival_s)
    np.testing.assert_array_equal(scaled.prompt_tokens, window.prompt_tokens)


def test_scaling_errors() -> None:
    with pytest.raises(ConfigError, match="target_peak_rate_per_s"):
        scale_arrivals([0.0, 1.0], target_peak_rate_per_s=0.0)
    with pytest.raises(ConfigError, match="less than one request"):
        scale_arrivals([0.0, 1.0], target_peak_rate_per_s=0.01)
    with pytest.raises(TraceError, match="has 2 requests"):
        scale_arrivals([0.0, 1.0], target_peak_rate_per_s=1.0)
    with pytest.raises(TraceError, match="share one arrival time"):
        scale_arrivals([0.0, 5.0, 5.0, 5.0], target_peak_rate_per_s=2 / 60)
    with pytest.raises(ConfigError, match="rate_factor"):
        scale_requests([], rate_factor=-1.0)
