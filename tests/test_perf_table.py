"""Profile tables: the measured H100 layout is first-class, our superset round-trips, and
format errors name the file, line and column."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from throttllem._data import data_file
from throttllem._errors import ConfigError
from throttllem._perf.table import (
    ALL_COLUMNS,
    BASE_COLUMNS,
    ProfileRow,
    concat,
    read_table,
    write_table,
)

MEASURED = "gpu-profiles/h100-sxm-llama3-8b-shape.csv"
HEADER = ",".join(BASE_COLUMNS)


def _row(**kw: object) -> ProfileRow:
    base: dict[str, object] = {
        "phase": "decode", "batch": 4, "ctx": 100, "tokens": 1, "iter_ms": 7.5,
        "iter_ms_p10": 7.4, "iter_ms_p90": 7.6, "energy_j_per_iter": 3.0, "avg_power_w": 400.0,
        "sm_clock_mhz": 1980.0, "kv_gib": 0.05, "requested_clock_mhz": 1980.0,
        "prefill_tokens": 0, "kv_tokens": 400, "kv_blocks": 28, "target": "twin",
        "clock_locked": True}
    base.update(kw)
    return ProfileRow(**base)  # type: ignore[arg-type]


def test_measured_h100_table_loads_and_maps_to_features() -> None:
    t = read_table(data_file(MEASURED))
    assert len(t) == 59
    assert t.phase.count("decode") == 51
    assert t.phase.count("prefill") == 8
    b, kv, p, f = t.features()
    dec = np.asarray(t.phase) == "decode"
    # decode: (batch, batch × ctx, 0); prefill: (0, 0, batch × tokens)
    np.testing.assert_array_equal(b[dec], t.batch[dec])
    np.testing.assert_array_equal(kv[dec], t.batch[dec] * t.ctx[dec])
    assert np.all(p[dec] == 0)
    assert np.all(b[~dec] == 0)
    assert np.all(kv[~dec] == 0)
    np.testing.assert_array_equal(p[~dec], t.batch[~dec] * t.tokens[~dec])
    # the observed clock is the feature: prefill rows ran below the top clock
    np.testing.assert_array_equal(f, t.sm_clock_mhz)
    assert f.min() == 1560
    assert f.max() == 1980
    assert np.isnan(t.requested_clock_mhz).all()  # base layout: no extras
    assert t.iter_s[0] == pytest.approx(6.9025e-3)


def test_superset_round_trip(tmp_path: Path) -> None:
    rows = [_row(), _row(phase="prefill", batch=2, ctx=512, tokens=512, kv_tokens=0,
                         prefill_tokens=1024, clock_locked=False, requested_clock_mhz=None),
            _row(phase="mixed", batch=8, ctx=300, kv_tokens=2400, prefill_tokens=700)]
    path = tmp_path / "p.csv"
    assert write_table(path, rows) == 3
    assert path.read_text().splitlines()[0] == ",".join(ALL_COLUMNS)
    t = read_table(path)
    assert t.phase == ("decode", "prefill", "mixed")
    assert t.clock_locked == (True, False, True)
    assert np.isnan(t.requested_clock_mhz[1])
    b, kv, p, _ = t.features()
    assert b.tolist() == [4, 0, 8]
    assert kv.tolist() == [400, 0, 2400]
    assert p.tolist() == [0, 1024, 700]
    assert t.target == ("twin", "twin", "twin")
    both = concat([t, t.subset([2])])
    assert len(both) == 4
    assert both.phase[-1] == "mixed"


def test_unknown_columns_are_ignored_and_optional_ones_may_be_absent(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("note,phase,batch,ctx,tokens,iter_ms,sm_clock_mhz\n"
                    "hello,decode,2,64,1,7.0,1980\n\n")
    t = read_table(path)
    assert len(t) == 1
    assert np.isnan(t.energy_j_per_iter[0])


def test_empty_clock_falls_back_to_requested(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("phase,batch,ctx,tokens,iter_ms,sm_clock_mhz,requested_clock_mhz\n"
                    "decode,2,64,1,7.0,,1500\n")
    assert read_table(path).features()[3].tolist() == [1500.0]


@pytest.mark.parametrize(("body", "needle"), [
    (HEADER + "\ndecode,2,64,1,abc,,,,,1980,\n", "line 2, column iter_ms: 'abc' is not a number"),
    (HEADER + "\ndecode,2,64,1,7,,,,,1980,\nwarmup,2,64,1,7,,,,,1980,\n",
     "line 3, column phase: 'warmup' is not one of"),
    (HEADER + "\ndecode,0,64,1,7,,,,,1980,\n", "line 2, column batch: 0.0 must be at least 1"),
    (HEADER + "\ndecode,2.5,64,1,7,,,,,1980,\n", "column batch: 2.5 must be a whole number"),
    (HEADER + "\ndecode,2,64,1,-1,,,,,1980,\n", "column iter_ms: -1.0 must be > 0"),
    (HEADER + "\ndecode,2,64,1,7,,,,,,\n", "line 2, column sm_clock_mhz: empty"),
    (HEADER + "\ndecode,2,64,1,,,,,,1980,\n", "line 2, column iter_ms: empty"),
    ("phase,batch,ctx,tokens,sm_clock_mhz\ndecode,1,1,1,1980\n", "header lacks column(s) iter_ms"),
    (HEADER.replace("ctx", "batch"), "appear twice"),
    ("", "empty file"),
    (HEADER + "\n", "a header but no data rows"),
    (HEADER + ",kv_tokens\nmixed,2,64,1,7,,,,,1980,,\n", "a mixed row needs"),
    (HEADER + "\ndecode,2,64,1,7,,,,,1980,,extra\n", "12 fields but the header has 11"),
])
def test_format_errors_name_file_line_and_column(tmp_path: Path, body: str, needle: str) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(body)
    with pytest.raises(ConfigError) as err:
        read_table(path)
    assert needle in str(err.value)
    assert str(path) in str(err.value)


def test_parquet_is_refused_with_a_clear_message(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"pyarrow.*not a dependency.*profile\.csv"):
        write_table(tmp_path / "profile.parquet", [_row()])
    with pytest.raises(ConfigError, match="Parquet needs pyarrow"):
        read_table(tmp_path / "profile.parquet")
    assert not (tmp_path / "profile.parquet").exists()


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read profile table"):
        read_table(tmp_path / "nope.csv")
