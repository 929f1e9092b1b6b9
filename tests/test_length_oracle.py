"""Oracle length predictions with injected error (trace replay)."""

from __future__ import annotations

import numpy as np
import pytest

from throttllem import ConfigError, ModelError
from throttllem._length.oracle import OraclePredictor
from throttllem._length.runtime import DEFAULT_MODEL_DIR, read_metrics

TRUE = np.random.default_rng(7).integers(1, 2000, size=20_000)


def test_zero_error_is_exact() -> None:
    median, upper = OraclePredictor(0.0, seed=3).predict(TRUE)
    np.testing.assert_array_equal(median, TRUE.astype(float))
    np.testing.assert_array_equal(upper, TRUE.astype(float))


@pytest.mark.parametrize("err", [0.15, 0.30])
def test_uniform_error_spread_matches(err: float) -> None:
    median, upper = OraclePredictor(err, seed=1).predict(TRUE)
    ratio = median / np.maximum(TRUE, 1)
    big = TRUE >= 20  # the 1-token floor distorts tiny lengths
    r = ratio[big]
    assert r.min() >= 1 - err - 1e-12
    assert r.max() <= 1 + err + 1e-12
    assert np.mean(np.abs(r - 1)) == pytest.approx(err / 2, rel=0.03)
    assert np.std(r) == pytest.approx(err / np.sqrt(3), rel=0.03)
    assert abs(np.mean(r) - 1) < 0.01
    # the upper quantile covers ~90% of the true lengths, and is never below the median
    assert np.mean(upper >= TRUE) == pytest.approx(0.9, abs=0.01)
    assert np.all(upper >= median)


def test_lognormal_error() -> None:
    median, upper = OraclePredictor(0.3, seed=2, distribution="lognormal").predict(TRUE)
    log_ratio = np.log(median / TRUE)[TRUE >= 20]
    assert np.std(log_ratio) == pytest.approx(0.3, rel=0.03)
    assert abs(np.median(log_ratio)) < 0.01
    assert np.mean(upper >= TRUE) == pytest.approx(0.9, abs=0.01)


def test_measured_error_follows_the_models_distribution() -> None:
    metrics = read_metrics(DEFAULT_MODEL_DIR)
    dist = metrics["error_distribution"]
    oracle = OraclePredictor("measured", seed=5)
    median, upper = oracle.predict(TRUE)
    ratio = median / TRUE
    big = TRUE >= 50
    for level in (0.1, 0.5, 0.9):
        want = np.interp(level, dist["levels"], dist["ratio_pred_over_true"])
        assert np.quantile(ratio[big], level) == pytest.approx(want, rel=0.05)
    within25 = float(np.mean(np.abs(ratio[big] - 1) <= 0.25))
    assert within25 == pytest.approx(metrics["test"]["within25"], abs=0.03)
    assert np.mean(upper >= TRUE) == pytest.approx(0.9, abs=0.015)
    # a metrics dict works as well as the file
    m2, _ = OraclePredictor("measured", seed=5, metrics=metrics).predict(TRUE[:100])
    np.testing.assert_array_equal(m2, median[:100])


def test_pure_and_seeded() -> None:
    a = OraclePredictor(0.3, seed=11)
    np.testing.assert_array_equal(a.predict(TRUE)[0], a.predict(TRUE)[0])
    np.testing.assert_array_equal(
        a.predict(TRUE)[0], OraclePredictor(0.3, seed=11).predict(TRUE)[0]
    )
    assert not np.array_equal(a.predict(TRUE)[0], OraclePredictor(0.3, seed=12).predict(TRUE)[0])
    # with request ids as keys the noise of a request does not depend on its batch
    ids = [f"req-{i}" for i in range(10)]
    whole, _ = a.predict(TRUE[:10], keys=ids)
    alone, _ = a.predict(TRUE[3:4], keys=ids[3:4])
    assert alone[0] == whole[3]
    ints, _ = a.predict(TRUE[:10], keys=list(range(100, 110)))
    assert ints[3] == a.predict(TRUE[3:4], keys=[103])[0][0]


def test_rejects_bad_settings() -> None:
    for bad in (-0.1, 1.0, 2, "sometimes", True):
        with pytest.raises(ConfigError):
            OraclePredictor(bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        OraclePredictor(0.1, distribution="cauchy")  # type: ignore[arg-type]
    with pytest.raises(ModelError):
        OraclePredictor("measured", metrics={"no": "distribution"})
    with pytest.raises(ModelError):
        OraclePredictor(
            "measured",
            metrics={
                "error_distribution": {"levels": [0.0, 0.5], "ratio_pred_over_true": [1.0, 0.5]}
            },
        )
    with pytest.raises(ValueError, match="keys"):
        OraclePredictor(0.1).predict([1, 2], keys=[1])
    with pytest.raises(ValueError, match="finite"):
        OraclePredictor(0.1).predict([1, -2])
