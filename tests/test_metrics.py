"""Metrics against numbers computed by hand (M4 definitions: sMAPE, MASE, Naive2, OWA)."""
import math

import numpy as np
import pytest

from vqext import metrics as M


def test_smape_by_hand():
    # 200/2 * (10/210 + 20/380)
    assert M.smape([100, 200], [110, 180]) == pytest.approx(100 * (10 / 210 + 20 / 380))
    assert M.smape([0, 5], [0, 5]) == 0.0  # 0/0 terms count as a perfect forecast


def test_mae_rmse_by_hand():
    assert M.mae([1, 2, 3], [2, 2, 5]) == pytest.approx(1.0)
    assert M.rmse([1, 2, 3], [2, 2, 5]) == pytest.approx(math.sqrt(5 / 3))


def test_mase_by_hand():
    insample = [1, 3, 2, 5, 4]
    # naive scale: |3-1|, |2-3|, |5-2|, |4-5| -> 7/4; MAE of [5,5] against [6,7] = 1.5
    assert M.mase([6, 7], [5, 5], insample, 1) == pytest.approx(1.5 / 1.75)
    # season 2: |2-1|, |5-3|, |4-2| -> 5/3
    assert M.mase([6, 7], [5, 5], insample, 2) == pytest.approx(1.5 / (5 / 3))
    assert math.isnan(M.mase([1.0], [2.0], [3, 3, 3], 1))  # constant history: no scale
    with pytest.raises(ValueError):
        M.mase([1.0], [1.0], [1, 2], 2)


def test_acf_and_seasonality_test_by_hand():
    x = np.array([1, 5, 9] * 8, dtype=float)  # period 3, 24 points; deviations -4, 0, 4; sum of squares 256
    r = M.acf(x, 4)
    assert r == pytest.approx([-112 / 256, -128 / 256, 224 / 256, -96 / 256])
    # lag 4: |r4| = 0.375 against 1.645 / sqrt(24) * sqrt(1 + 2 (r1^2 + r2^2 + r3^2)) = 0.6204
    assert not M.seasonality_test(x, 4)
    assert M.seasonality_test(x, 3)  # r3 = 0.875 against 1.645 / sqrt(24) * sqrt(1 + 2 (r1^2 + r2^2)) = 0.461
    assert not M.seasonality_test(x[:8], 3)  # fewer than 3 seasons of data: never seasonal
    # Season 24 needs floor(10 log10 n) >= 24 (R's default acf lags), i.e. n >= 252.
    daily = np.tile(np.r_[np.ones(12), 3 * np.ones(12)], 12)
    assert M.seasonality_test(daily[:252], 24) and not M.seasonality_test(daily[:251], 24)


SEASONAL = np.array([10, 20, 30, 40, 12, 22, 32, 42, 14, 24, 34, 44], dtype=float)


def test_naive2_by_hand():
    # Centred 2x4 moving average at t = 2..9: 25.25, 25.75, ..., 28.75 (rising by 0.5).
    trend = {t: 25.25 + 0.5 * (t - 2) for t in range(2, 10)}
    ratio = {t: SEASONAL[t] / trend[t] for t in trend}
    figure = np.array([(ratio[4] + ratio[8]) / 2, (ratio[5] + ratio[9]) / 2,
                       (ratio[2] + ratio[6]) / 2, (ratio[3] + ratio[7]) / 2])
    figure /= figure.mean()
    assert M.seasonal_indices(SEASONAL, 4) == pytest.approx(figure)
    assert M.seasonality_test(SEASONAL, 4)
    level = 44 / figure[3]  # the last point, seasonally adjusted (t = 11 is position 3)
    expected = level * figure[[0, 1, 2, 3, 0, 1]]
    assert M.naive2(SEASONAL, 6, 4) == pytest.approx(expected)
    # Not seasonal at this season, season 1 and non-positive data: the naive forecast.
    assert M.naive2(SEASONAL, 3, 5).tolist() == [44, 44, 44]
    assert M.naive2(SEASONAL, 3, 1).tolist() == [44, 44, 44]
    assert M.naive2(SEASONAL - 20, 2, 4).tolist() == [24, 24]


def test_odd_season_moving_average():
    x = np.array([3, 1, 2] * 4, dtype=float) + np.arange(12) * 0.3
    trend_mid = np.convolve(x, np.ones(3) / 3, mode="valid")  # t = 1..10
    ratio = x[1:11] / trend_mid
    figure = np.array([ratio[[2, 5, 8]].mean(), ratio[[0, 3, 6, 9]].mean(), ratio[[1, 4, 7]].mean()])
    assert M.seasonal_indices(x, 3) == pytest.approx(figure / figure.mean())


def test_score_and_owa_aggregate_by_hand():
    insample = SEASONAL
    y = np.array([16.0, 26.0])
    f = np.array([15.0, 27.0])
    s = M.score(y, f, insample, 4)
    n2 = M.naive2(insample, 2, 4)
    assert s.naive2_smape == pytest.approx(M.smape(y, n2))
    assert s.mase == pytest.approx(1.0 / 2.0)  # seasonal differences of SEASONAL are all 2
    t = M.score(np.array([50.0, 51.0]), np.array([48.0, 51.0]), insample, 4)
    agg = M.aggregate([s, t])
    assert agg["smape"] == pytest.approx((s.smape + t.smape) / 2)
    assert agg["mase"] == pytest.approx((s.mase + t.mase) / 2)
    expected = 0.5 * ((s.smape + t.smape) / (s.naive2_smape + t.naive2_smape)
                      + (s.mase + t.mase) / (s.naive2_mase + t.naive2_mase))
    assert agg["owa"] == pytest.approx(expected)
    # Naive2 scored against itself has OWA 1 by definition.
    self_score = M.score(y, n2, insample, 4)
    assert M.aggregate([self_score])["owa"] == pytest.approx(1.0)
