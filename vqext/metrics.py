"""Point-forecast accuracy: MAE, RMSE, MASE, sMAPE and OWA relative to Naive2, as the M4 competition
defines them.

One forecast is scored against its truth and the history it was made from (``insample``: every
point before the forecast origin). Over many forecasts (series, backtest windows) the scores
aggregate as M4 does: the mean of sMAPE and of MASE over all forecasts, then OWA from those two
means and the same means of Naive2.

Definitions (``y`` the truth, ``f`` the forecast, both of length ``h``; ``x`` the in-sample part of
length ``n``; season ``m``):

* sMAPE = 200/h * sum |y - f| / (|y| + |f|), in percent (a term with ``|y| + |f| = 0`` counts 0).
* MASE = mean |y - f| / scale, scale = 1/(n - m) * sum_{t >= m} |x_t - x_{t-m}| (the in-sample
  seasonal-naive MAE; ``m = 1``: the naive MAE). NaN when the scale is 0 (a constant history).
* Naive2: the naive forecast of the seasonally adjusted series, re-seasonalised. The series is
  adjusted with a classical multiplicative decomposition when ``m > 1``, the series has at least
  ``3m`` points, and the 90 % autocorrelation test at lag ``m`` passes; as in the M4 organisers'
  R code (``SeasonalityTest`` and ``decompose(type="multiplicative")``). M4 data is positive; a
  history with a value <= 0 is not adjusted (multiplicative indices are meaningless there).
* OWA = (sMAPE / sMAPE_Naive2 + MASE / MASE_Naive2) / 2.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SEASONALITY_TCRIT = 1.645  # one-sided 90 % (M4's SeasonalityTest)


def _arrays(y, f):
    y = np.asarray(y, dtype=np.float64)
    f = np.asarray(f, dtype=np.float64)
    if y.shape != f.shape or y.ndim != 1 or len(y) == 0:
        raise ValueError(f"truth and forecast must be 1-D of the same non-zero length, got {y.shape} and {f.shape}")
    return y, f


def mae(y, f) -> float:
    y, f = _arrays(y, f)
    return float(np.mean(np.abs(y - f)))


def rmse(y, f) -> float:
    y, f = _arrays(y, f)
    return float(np.sqrt(np.mean((y - f) ** 2)))


def smape(y, f) -> float:
    """M4's sMAPE in percent: 200/h * sum |y - f| / (|y| + |f|)."""
    y, f = _arrays(y, f)
    den = np.abs(y) + np.abs(f)
    terms = np.divide(np.abs(y - f), den, out=np.zeros_like(den), where=den > 0)
    return float(200.0 * np.mean(terms))


def mase_scale(insample, season: int = 1) -> float:
    """The in-sample seasonal-naive MAE (naive for ``season`` 1): MASE's denominator."""
    x = np.asarray(insample, dtype=np.float64)
    if season < 1:
        raise ValueError(f"season must be at least 1, got {season}")
    if len(x) <= season:
        raise ValueError(f"MASE needs more than season={season} in-sample points, got {len(x)}")
    return float(np.mean(np.abs(x[season:] - x[:-season])))


def mase(y, f, insample, season: int = 1) -> float:
    scale = mase_scale(insample, season)
    return mae(y, f) / scale if scale > 0 else float("nan")


# ------------------------------------------------------------------------------------------ Naive2
def acf(x, max_lag: int) -> np.ndarray:
    """Autocorrelations at lags 1..max_lag as R's ``acf`` computes them (one mean, one variance)."""
    x = np.asarray(x, dtype=np.float64)
    d = x - x.mean()
    den = float(np.dot(d, d))
    if den == 0:
        return np.zeros(max_lag)
    return np.array([np.dot(d[k:], d[:len(d) - k]) / den for k in range(1, max_lag + 1)])


def seasonality_test(x, season: int) -> bool:
    """M4's test: |r_m| > 1.645 * sqrt((1 + 2 * sum_{k<m} r_k^2) / n); never with fewer than 3m points
    or with m beyond R's default acf lags."""
    x = np.asarray(x, dtype=np.float64)
    if season <= 1 or len(x) < 3 * season:
        return False
    # M4's R code reads lag m from acf()'s default lags, 1..floor(10 log10 n); a longer season is NA
    # there, which the test counts as not seasonal (e.g. season 24 with fewer than 252 points).
    if int(np.floor(10 * np.log10(len(x)))) < season:
        return False
    r = acf(x, season)
    limit = SEASONALITY_TCRIT / np.sqrt(len(x)) * np.sqrt(1.0 + 2.0 * np.sum(r[:season - 1] ** 2))
    return bool(abs(r[season - 1]) > limit)


def seasonal_indices(x, season: int) -> np.ndarray:
    """Multiplicative seasonal figure of R's ``decompose``: index ``i`` belongs to the times
    ``t`` with ``t % season == i`` (the series starts at the first position of its cycle)."""
    x = np.asarray(x, dtype=np.float64)
    n = len(x)
    if season % 2 == 0:  # centred 2 x m moving average
        weights = np.r_[0.5, np.ones(season - 1), 0.5] / season
    else:
        weights = np.ones(season) / season
    half = len(weights) // 2
    trend = np.full(n, np.nan)
    trend[half:n - half] = np.convolve(x, weights, mode="valid")
    ratio = x / trend
    padded = np.r_[ratio, np.full(-n % season, np.nan)].reshape(-1, season)
    figure = np.nanmean(padded, axis=0)
    return figure / figure.mean()


def naive2(insample, horizon: int, season: int = 1) -> np.ndarray:
    """M4's Naive2 forecast of the ``horizon`` points after ``insample``."""
    x = np.asarray(insample, dtype=np.float64)
    if len(x) == 0:
        raise ValueError("Naive2 needs at least one in-sample point")
    if season > 1 and np.all(x > 0) and seasonality_test(x, season):
        figure = seasonal_indices(x, season)
        n = len(x)
        level = x[-1] / figure[(n - 1) % season]
        return level * figure[(n + np.arange(horizon)) % season]
    return np.full(horizon, x[-1])


# ------------------------------------------------------------------------------------- scoring
@dataclass(frozen=True)
class Score:
    """The scores of one forecast, with Naive2's sMAPE and MASE on the same window."""
    mae: float
    rmse: float
    smape: float
    mase: float
    naive2_smape: float
    naive2_mase: float

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def score(y, f, insample, season: int = 1) -> Score:
    """Every metric of one forecast ``f`` of ``y`` made from ``insample``."""
    y, f = _arrays(y, f)
    n2 = naive2(insample, len(y), season)
    return Score(mae(y, f), rmse(y, f), smape(y, f), mase(y, f, insample, season),
                 smape(y, n2), mase(y, n2, insample, season))


def owa(smape_value: float, mase_value: float, naive2_smape: float, naive2_mase: float) -> float:
    if not (naive2_smape > 0 and naive2_mase > 0):
        return float("nan")
    return 0.5 * (smape_value / naive2_smape + mase_value / naive2_mase)


METRICS = ("mae", "rmse", "mase", "smape", "owa")


def aggregate(scores) -> dict:
    """M4 aggregation over many forecasts: the mean of each metric, then OWA from the means.

    Forecasts whose MASE is undefined (constant history) are left out of the MASE means (for the
    model and Naive2 alike); ``mase_undefined`` counts them.
    """
    scores = list(scores)
    if not scores:
        return {k: float("nan") for k in METRICS} | {"count": 0, "mase_undefined": 0}
    table = {k: np.array([getattr(s, k) for s in scores], dtype=np.float64) for k in Score.__dataclass_fields__}
    defined = np.isfinite(table["mase"]) & np.isfinite(table["naive2_mase"])
    out = {k: float(np.mean(table[k])) for k in ("mae", "rmse", "smape", "naive2_smape")}
    for k in ("mase", "naive2_mase"):
        out[k] = float(np.mean(table[k][defined])) if defined.any() else float("nan")
    out["owa"] = owa(out["smape"], out["mase"], out["naive2_smape"], out["naive2_mase"])
    out["count"] = len(scores)
    out["mase_undefined"] = int((~defined).sum())
    return out
