"""Rolling-origin evaluation of forecasters on the same windows of the same series.

Window ``k`` (0-based, of ``K``) of a series of ``n`` points forecasts the ``H`` points after the
origin ``n - H - (K - 1 - k) * S``: the last window ends at the end of the series, earlier ones
``S`` points apart (statsforecast's ``cross_validation`` places its cutoffs the same way). Every
forecaster sees only the points before each origin: a window's history is cut before it is handed
over, so no forecaster can read the future.

Forecasters follow the protocol in :mod:`vqext.baselines` (``fit(train)``,
``predict(h, history)``, ``refits``). With ``refit`` a forecaster is fitted again at every origin;
without it, once on the history before the first origin, and later windows only pass their longer
history to ``predict``. Statistical baselines (``refits = True``) estimate their parameters inside
``predict``, so they are re-estimated at every origin either way.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pandas as pd

from . import metrics as M
from .errors import DataError, VqextError

Factory = Callable[[], object]  # () -> forecaster (a fresh, unfitted one)


def window_origins(n: int, horizon: int, windows: int, step: int) -> list[int]:
    """The forecast origins (index of the first forecast point) of a series of ``n`` points."""
    return [n - horizon - (windows - 1 - k) * step for k in range(windows)]


def check_windows(lengths: dict[str, int], horizon: int, windows: int, step: int, season: int) -> None:
    """One clear line for settings the data cannot support."""
    for value, flag in ((horizon, "--horizon"), (windows, "--windows"), (step, "--step"), (season, "--season")):
        if value < 1:
            raise DataError(f"{flag} must be at least 1, got {value}")
    if not lengths:
        raise DataError("no series to backtest")
    # Scoring needs more than one season of history before the first origin (MASE's scale).
    need = horizon + (windows - 1) * step + season + 1
    short = {uid: n for uid, n in lengths.items() if n < need}
    if short:
        uid, n = min(short.items(), key=lambda kv: kv[1])
        raise DataError(f"series {uid!r} has {n} points, too short for --horizon {horizon} --windows {windows} "
                        f"--step {step} --season {season} (needs at least {need}); "
                        f"{len(short)} of {len(lengths)} series are too short")


@dataclass
class BacktestResult:
    horizon: int
    windows: int
    step: int
    season: int
    refit: bool
    forecasts: pd.DataFrame      # unique_id, window, origin, step, y, model, y_hat
    scores: pd.DataFrame         # one row per model, series and window: the metrics.Score fields
    seconds: dict[str, float]    # wall seconds of fit + predict, per model
    cpu_seconds: dict[str, float]  # CPU seconds of this process in fit + predict (wall is noisy on a shared machine)
    refits: dict[str, bool]      # per model: re-estimated at every origin
    series: dict[str, np.ndarray] = field(repr=False, default_factory=dict)
    models: list[str] = field(default_factory=list)

    def summary(self) -> pd.DataFrame:
        """Per model over all series and windows (M4 aggregation), with seconds."""
        rows = [{"model": m, **self._aggregate(self.scores[self.scores.model == m]),
                 "seconds": self.seconds[m], "cpu_seconds": self.cpu_seconds[m], "refit": self.refits[m]} for m in self.models]
        return pd.DataFrame(rows)

    def per_series(self) -> pd.DataFrame:
        rows = []
        for uid in self.series:
            for m in self.models:
                part = self.scores[(self.scores.model == m) & (self.scores.unique_id == uid)]
                rows.append({"unique_id": uid, "model": m, **self._aggregate(part)})
        return pd.DataFrame(rows)

    def per_window(self) -> pd.DataFrame:
        rows = []
        for k in range(self.windows):
            for m in self.models:
                part = self.scores[(self.scores.model == m) & (self.scores.window == k)]
                rows.append({"window": k, "model": m, **self._aggregate(part)})
        return pd.DataFrame(rows)

    @staticmethod
    def _aggregate(part: pd.DataFrame) -> dict:
        scores = [M.Score(*(r[f] for f in M.Score.__dataclass_fields__)) for _, r in part.iterrows()]
        agg = M.aggregate(scores)
        return {k: agg[k] for k in M.METRICS}


def _frame_positions(frame: pd.DataFrame) -> dict[str, np.ndarray]:
    """Each series' values in time order (``ds`` sorted within each id; ids in order of appearance)."""
    missing = {"unique_id", "y"} - set(frame.columns)
    if missing:
        raise DataError(f"backtest data lacks the column(s) {', '.join(sorted(missing))}")
    ids = frame["unique_id"].astype(str)
    order = pd.unique(ids)
    if "ds" in frame.columns:
        frame = frame.assign(unique_id=ids).sort_values(["ds"], kind="stable")
    else:
        frame = frame.assign(unique_id=ids)
    out = {}
    for uid, part in frame.groupby("unique_id", sort=False):
        values = part["y"].to_numpy(dtype=np.float64)
        if not np.all(np.isfinite(values)):
            raise DataError(f"series {uid!r} has missing or non-finite values")
        out[uid] = values
    return {u: out[u] for u in order}


def _history(series: dict[str, np.ndarray], cut: dict[str, int]) -> pd.DataFrame:
    """The long frame of every series up to (not including) its cut: positions as ``ds``."""
    ids, ds, ys = [], [], []
    for uid, values in series.items():
        n = cut[uid]
        ids.append(np.full(n, uid, dtype=object))
        ds.append(np.arange(n))
        ys.append(values[:n])
    return pd.DataFrame({"unique_id": np.concatenate(ids), "ds": np.concatenate(ds), "y": np.concatenate(ys)})


def _check_prediction(pred, name: str, ids, horizon: int) -> pd.DataFrame:
    if not isinstance(pred, pd.DataFrame) or not {"unique_id", "step", "y_hat"} <= set(pred.columns):
        raise VqextError(f"forecaster {name!r} must return a DataFrame with unique_id, step, y_hat")
    pred = pred[["unique_id", "step", "y_hat"]].copy()
    pred["unique_id"] = pred["unique_id"].astype(str)
    pred = pred[pred.step.between(1, horizon)]
    got = pred.groupby("unique_id").step.nunique()
    lacking = [u for u in ids if got.get(u, 0) != horizon]
    if lacking:
        raise VqextError(f"forecaster {name!r} did not forecast {horizon} steps for series {lacking[0]!r} "
                         f"({len(lacking)} series lack steps)")
    if not np.all(np.isfinite(pred.y_hat.to_numpy(dtype=np.float64))):
        raise VqextError(f"forecaster {name!r} returned non-finite forecasts")
    return pred


def run_backtest(frame: pd.DataFrame, forecasters: dict[str, Factory], *, horizon: int, windows: int = 1,
                 step: int | None = None, season: int = 1, refit: bool = False,
                 progress: Callable[[str], None] | None = None) -> BacktestResult:
    """Forecast every window of every series with every forecaster and score them.

    ``frame``: long format ``unique_id, [ds], y``. ``forecasters``: name -> factory of a fresh
    forecaster. ``step`` defaults to ``horizon`` (windows that do not overlap).
    """
    step = horizon if step is None else step
    series = _frame_positions(frame)
    check_windows({u: len(v) for u, v in series.items()}, horizon, windows, step, season)
    origins = {uid: window_origins(len(v), horizon, windows, step) for uid, v in series.items()}
    ids = list(series)
    rows, seconds, cpu_seconds, refits = [], {}, {}, {}
    for name, factory in forecasters.items():
        forecaster, spent, cpu = None, 0.0, 0.0
        for k in range(windows):
            history = _history(series, {u: origins[u][k] for u in ids})
            started, cpu_started = time.perf_counter(), time.process_time()
            if forecaster is None or refit:
                forecaster = factory()
                if k == 0 and hasattr(forecaster, "warmup"):
                    forecaster.warmup()
                    started, cpu_started = time.perf_counter(), time.process_time()
                forecaster.fit(history)
            pred = forecaster.predict(horizon, history=history)
            spent += time.perf_counter() - started
            cpu += time.process_time() - cpu_started
            pred = _check_prediction(pred, name, ids, horizon)
            for uid, part in pred.groupby("unique_id", sort=False):
                part = part.sort_values("step")
                o = origins[uid][k]
                rows.append(pd.DataFrame({"unique_id": uid, "window": k, "origin": o, "step": part.step.to_numpy(),
                                          "y": series[uid][o:o + horizon], "model": name,
                                          "y_hat": part.y_hat.to_numpy(dtype=np.float64)}))
            if progress:
                progress(f"{name}: window {k + 1}/{windows} ({spent:.1f} s)")
        seconds[name] = spent
        cpu_seconds[name] = cpu
        refits[name] = bool(refit or getattr(forecaster, "refits", False))
    forecasts = pd.concat(rows, ignore_index=True)
    scores = _score(forecasts, series, season)
    return BacktestResult(horizon, windows, step, season, refit, forecasts, scores, seconds, cpu_seconds, refits,
                          series, list(forecasters))


def combine(result: BacktestResult, name: str, members: list[str]) -> BacktestResult:
    """``result`` with one more model, ``name``: the point-wise median of ``members``' forecasts
    (an ensemble of seeds, say), scored on the same windows. Its seconds are the members' sum."""
    missing = [m for m in members if m not in result.models]
    if missing or len(members) < 2:
        raise ValueError(f"combine: needs two or more of the result's models, got {members} (unknown: {missing})")
    if name in result.models:
        raise ValueError(f"combine: the result already has a model named {name!r}")
    keys = ["unique_id", "window", "origin", "step", "y"]
    part = result.forecasts[result.forecasts.model.isin(members)]
    combined = part.groupby(keys, sort=False, as_index=False).y_hat.median()
    combined.insert(len(keys), "model", name)
    forecasts = pd.concat([result.forecasts, combined[result.forecasts.columns]], ignore_index=True)
    scores = pd.concat([result.scores, _score(combined, result.series, result.season)], ignore_index=True)
    total = {key: sum(getattr(result, key)[m] for m in members) for key in ("seconds", "cpu_seconds")}
    return dataclasses.replace(
        result, forecasts=forecasts, scores=scores, seconds={**result.seconds, name: total["seconds"]},
        cpu_seconds={**result.cpu_seconds, name: total["cpu_seconds"]},
        refits={**result.refits, name: any(result.refits[m] for m in members)}, models=[*result.models, name])


def _score(forecasts: pd.DataFrame, series: dict[str, np.ndarray], season: int) -> pd.DataFrame:
    rows = []
    for (model, uid, k), part in forecasts.groupby(["model", "unique_id", "window"], sort=False):
        o = int(part.origin.iloc[0])
        s = M.score(part.y.to_numpy(), part.y_hat.to_numpy(), series[uid][:o], season)
        rows.append({"model": model, "unique_id": uid, "window": k, **s.as_dict()})
    return pd.DataFrame(rows)


def refit_statement(result: BacktestResult) -> str:
    """What was (re)fitted where, in one line for the output."""
    trained = [m for m in result.models if not result.refits[m]]
    again = [m for m in result.models if result.refits[m]]
    parts = []
    if again:
        parts.append(f"refit at each origin: {', '.join(again)}")
    if trained:
        parts.append(f"trained once before the first origin: {', '.join(trained)}")
    return "; ".join(parts)


class VqextForecaster:
    """vqext's global training and forecasting behind the backtest's forecaster protocol."""

    refits = False  # trained by fit(); predict() only conditions on the longer history

    def __init__(self, cfg, quiet: bool = True):
        self.cfg = cfg
        self.quiet = quiet
        self.fitted = None

    @staticmethod
    def _panel(frame, name: str):
        from . import data as D

        if hasattr(D, "Panel") and hasattr(D.Panel, "from_frame"):
            return D.Panel.from_frame(frame, "unique_id", "ds", "y", source=name, name=name)
        # A list of Series, one per id (vqext.forecasting accepts it as a panel).
        return [D.Series(part["y"].to_numpy(dtype=np.float64), str(uid), name, "y")
                for uid, part in frame.groupby("unique_id", sort=False)]

    def fit(self, train):
        from .forecasting import fit

        self.fitted = fit(self.cfg, self._panel(train, "backtest-train"), quiet=self.quiet)
        return self

    def predict(self, h: int, history=None):
        import vqext

        out = vqext.forecast(self.fitted, self._panel(history, "backtest-history"), h, normalize=self.normalize)
        return out[["unique_id", "step", "y_hat"]]

    #: Scaling of each series at prediction: None = the statistics saved when it was trained.
    normalize = None


class PretrainedForecaster(VqextForecaster):
    """A finished run's model applied without training on the backtest's data (zero-shot).

    Each series is scaled with its own history before the origin, never with statistics the run
    saved (a series of the same id in the run's training data may reach past the origin).
    """

    normalize = "series"

    def __init__(self, run_dir: str):
        from .forecasting import load

        super().__init__(None)
        self.fitted = load(run_dir)

    def fit(self, train):
        return self


def load_frame(spec: str | None, column, **data_options):
    """The data as a long frame ``unique_id, ds, y`` and a short label."""
    import numpy as np
    import pandas as pd

    from . import data as D

    if hasattr(D, "load_panel"):
        panel = D.load_panel(spec, column=column, **data_options)
        return panel.to_frame(), panel.name
    series = D.load_series(spec, column)
    return pd.DataFrame({"unique_id": series.name, "ds": np.arange(len(series)), "y": series.values}), series.name
