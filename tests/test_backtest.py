"""Rolling-origin backtest: windows, no leakage, hand-computed numbers, agreement with statsforecast."""
import numpy as np
import pandas as pd
import pytest

from vqext import backtest as B
from vqext import metrics as M
from vqext.errors import DataError


class Recorder:
    """Forecasts the mean of the last 3 history points; records every history it is shown."""

    refits = False

    def __init__(self, log):
        self.log = log

    def fit(self, train):
        self.log.append(("fit", {u: p.ds.max() for u, p in train.groupby("unique_id")}))
        self.last = {u: p.y.to_numpy() for u, p in train.groupby("unique_id")}

    def predict(self, h, history=None):
        self.log.append(("predict", {u: p.ds.max() for u, p in history.groupby("unique_id")}))
        rows = [(u, s, p.y.to_numpy()[-3:].mean()) for u, p in history.groupby("unique_id") for s in range(1, h + 1)]
        return pd.DataFrame(rows, columns=["unique_id", "step", "y_hat"])


def panel(lengths=(40, 33), seed=0):
    rng = np.random.default_rng(seed)
    parts = [pd.DataFrame({"unique_id": f"s{i}", "ds": np.arange(n), "y": 50 + np.cumsum(rng.normal(size=n))})
             for i, n in enumerate(lengths)]
    return pd.concat(parts, ignore_index=True)


def test_window_origins():
    assert B.window_origins(20, 3, 3, 2) == [13, 15, 17]  # the last window ends at the end
    assert B.window_origins(20, 4, 1, 9) == [16]


@pytest.mark.parametrize("refit", [True, False])
def test_forecasters_only_see_data_before_each_origin(refit):
    log = []
    df = panel()
    res = B.run_backtest(df, {"rec": lambda: Recorder(log)}, horizon=4, windows=3, step=3, refit=refit)
    origins = {"s0": B.window_origins(40, 4, 3, 3), "s1": B.window_origins(33, 4, 3, 3)}
    predicts = [seen for kind, seen in log if kind == "predict"]
    fits = [seen for kind, seen in log if kind == "fit"]
    for k, seen in enumerate(predicts):
        assert seen == {u: origins[u][k] - 1 for u in origins}  # the last point shown precedes the origin
    assert len(fits) == (3 if refit else 1)
    assert fits[0] == {u: origins[u][0] - 1 for u in origins}
    assert res.refits["rec"] is refit
    # The forecasts are the mean of the 3 points before each origin, scored against the next 4.
    f = res.forecasts
    for u, values in B._frame_positions(df).items():
        for k, o in enumerate(origins[u]):
            row = f[(f.unique_id == u) & (f.window == k)]
            assert row.origin.iloc[0] == o
            assert np.allclose(row.y_hat, values[o - 3:o].mean())
            assert np.allclose(row.y, values[o:o + 4])


def test_too_short_series_is_one_clear_error():
    with pytest.raises(DataError, match="'s1' has 33 points, too short .*needs at least 35"):
        B.run_backtest(panel(), {"rec": lambda: Recorder([])}, horizon=10, windows=3, step=10, season=4)


class SeasonalNaiveByHand:
    refits = True

    def fit(self, train):
        pass

    def predict(self, h, history=None):
        rows = []
        for u, p in history.groupby("unique_id"):
            y = p.y.to_numpy()
            rows += [(u, s, y[len(y) - 4 + (s - 1) % 4]) for s in range(1, h + 1)]
        return pd.DataFrame(rows, columns=["unique_id", "step", "y_hat"])


def test_seasonal_naive_backtest_equals_hand_computation():
    y = np.array([5, 9, 7, 3, 6, 10, 8, 4, 7, 12, 9, 5, 8, 13, 11, 6], dtype=float)
    df = pd.DataFrame({"unique_id": "a", "ds": np.arange(16), "y": y})
    res = B.run_backtest(df, {"snaive": SeasonalNaiveByHand}, horizon=3, windows=2, step=2, season=4)
    # Origins 11 and 13. Window 0 forecasts y[11:14] = 5, 8, 13 with y[7:10] = 4, 7, 12;
    # window 1 forecasts y[13:16] = 13, 11, 6 with y[9:12] = 12, 9, 5.
    mae0, mae1 = (1 + 1 + 1) / 3, (1 + 2 + 1) / 3
    # Seasonal-naive scales: |y[t] - y[t-4]| for t = 4..10 is 1, 1, 1, 1, 1, 2, 1, and 1, 1 for t = 11, 12.
    scale0, scale1 = 8 / 7, 10 / 9
    smape0 = 200 / 3 * (1 / 9 + 1 / 15 + 1 / 25)
    smape1 = 200 / 3 * (1 / 25 + 2 / 20 + 1 / 11)
    summary = res.summary().set_index("model").loc["snaive"]
    assert summary["mae"] == pytest.approx((mae0 + mae1) / 2)
    assert summary["mase"] == pytest.approx((mae0 / scale0 + mae1 / scale1) / 2)
    assert summary["smape"] == pytest.approx((smape0 + smape1) / 2)
    n2 = [M.score(y[o:o + 3], M.naive2(y[:o], 3, 4), y[:o], 4) for o in (11, 13)]
    assert summary["owa"] == pytest.approx(M.owa(summary["smape"], summary["mase"],
                                                 np.mean([s.smape for s in n2]), np.mean([s.mase for s in n2])))
    per_window = res.per_window().set_index("window")
    assert per_window.loc[0, "mae"] == pytest.approx(mae0)
    assert per_window.loc[1, "mase"] == pytest.approx(mae1 / scale1)


def test_naive_and_seasonal_naive_agree_with_statsforecast_cross_validation():
    pytest.importorskip("statsforecast")
    from statsforecast import StatsForecast
    from statsforecast.models import Naive, SeasonalNaive

    from vqext import baselines

    df = panel(lengths=(60, 47), seed=3)
    h, k, s, m = 5, 3, 4, 7
    res = B.run_backtest(df, {"naive": lambda: baselines.make_baseline("naive", m),
                              "snaive": lambda: baselines.make_baseline("snaive", m)},
                         horizon=h, windows=k, step=s, season=m)
    cv = StatsForecast(models=[Naive(), SeasonalNaive(season_length=m)], freq=1, n_jobs=1).cross_validation(
        df=df, h=h, n_windows=k, step_size=s)
    cv = cv.reset_index() if "unique_id" not in cv.columns else cv
    cv["origin"] = cv.cutoff + 1
    for model, column in (("naive", "Naive"), ("snaive", "SeasonalNaive")):
        ours = res.forecasts[res.forecasts.model == model].assign(ds=lambda d: d.origin + d.step - 1)
        merged = ours.merge(cv, on=["unique_id", "ds", "origin"], how="outer", validate="one_to_one")
        assert len(merged) == len(ours) == len(df.unique_id.unique()) * k * h
        assert np.allclose(merged.y_hat, merged[column])
        assert np.allclose(merged.y_x, merged.y_y)


class Constant:
    refits = False

    def __init__(self, value):
        self.value = value

    def fit(self, train):
        pass

    def predict(self, h, history=None):
        return pd.DataFrame([(u, s, self.value) for u in history.unique_id.unique() for s in range(1, h + 1)],
                            columns=["unique_id", "step", "y_hat"])


def test_combining_forecasts_scores_their_pointwise_median():
    df = panel()
    res = B.run_backtest(df, {f"c{v}": (lambda v=v: Constant(v)) for v in (40.0, 50.0, 65.0)}, horizon=4, windows=2)
    both = B.combine(res, "median", ["c40.0", "c50.0", "c65.0"])
    assert both.models[-1] == "median" and res.models == ["c40.0", "c50.0", "c65.0"]  # the input is untouched
    mine = both.forecasts[both.forecasts.model == "median"]
    assert len(mine) == len(res.forecasts) // 3 and np.allclose(mine.y_hat, 50.0)
    # scored exactly as the member it equals
    ref = both.scores[both.scores.model == "c50.0"].drop(columns="model").reset_index(drop=True)
    got = both.scores[both.scores.model == "median"].drop(columns="model").reset_index(drop=True)
    pd.testing.assert_frame_equal(ref, got)
    assert both.seconds["median"] == pytest.approx(sum(res.seconds.values()))
    with pytest.raises(ValueError, match="two or more"):
        B.combine(res, "x", ["c40.0", "nope"])
    with pytest.raises(ValueError, match="already has"):
        B.combine(res, "c40.0", ["c40.0", "c50.0"])


def test_nhits_without_neuralforecast_is_one_clear_line(monkeypatch):
    from vqext import baselines as BL

    monkeypatch.setattr(BL, "neuralforecast_available", lambda: False)
    assert "NHITS" not in BL.available_baselines()
    from _runs import invoke

    r = invoke("backtest", "--data", "bundled:nile", "--horizon", "5", "--no-model", "--baselines", "naive,NHITS")
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert r.exit_code == 1 and len(lines) == 1, r.output
    assert "NHITS baseline needs neuralforecast" in lines[0] and "vqext[neural]" in lines[0]


def test_nhits_is_trained_once_and_forecasts_every_window_from_its_history():
    pytest.importorskip("neuralforecast")
    from neuralforecast.models import NHITS

    from vqext import baselines as BL

    made = []

    def make(h):
        made.append(h)
        return NHITS(h=h, input_size=2 * h, max_steps=3, val_check_steps=3, scaler_type="robust", random_seed=1,
                     enable_progress_bar=False, enable_model_summary=False, logger=False)

    frame = panel()
    res = B.run_backtest(frame, {"NHITS": lambda: BL.NeuralForecastBaseline(make, "NHITS")}, horizon=4, windows=2)
    assert made == [4]  # one model for both windows
    fc = res.forecasts
    assert len(fc) == 2 * 2 * 4 and np.isfinite(fc.y_hat).all()
    assert {m.input_size for m in [BL.nhits(12).make_model(6)]} == {18}  # the shipped factory: 3 horizons
