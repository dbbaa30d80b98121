"""Reference forecasters for ``vqext backtest`` and ``benchmarks/bench_m4.py``.

vqext's own baselines are statsforecast's ``Naive`` (``naive``), ``SeasonalNaive`` (``snaive``),
``AutoETS``, ``AutoTheta`` and ``AutoARIMA``, used through the library (the optional extra
``pip install 'vqext[baselines]'``), and neuralforecast's ``NHITS`` where that library is installed
(``pip install 'vqext[neural]'``). Plugins add more through the ``vqext.baselines`` entry-point
group: the entry point names a factory ``make(season: int) -> forecaster``.

A forecaster (the protocol the backtest drives, vqext's own model included) has

* ``fit(train)``: learn from a long-format frame ``unique_id, ds, y`` (``ds`` the integer position
  of each point in its series);
* ``predict(h, history=None)``: a frame ``unique_id, step (1..h), y_hat`` with the ``h`` points
  after the end of each series of ``history`` (default: the frame it was fitted on);
* optionally ``warmup()``: one-off work (imports, compilation) done before the timed runs;
* ``refits``: True when ``predict`` re-estimates the model on ``history`` itself (statistical
  models are fitted on the history of every window they forecast).
"""
from __future__ import annotations

import importlib.util
import warnings

import pandas as pd

from .errors import VqextError

EXTRA_HINT = "pip install 'vqext[baselines]'"
NEURAL_HINT = "pip install 'vqext[neural]' (neuralforecast; keep torch pinned: -c constraints with torch==X)"
STATS_BASELINES = ("naive", "snaive", "AutoETS", "AutoTheta", "AutoARIMA")
NEURAL_BASELINES = ("NHITS",)
BUILTIN_BASELINES = STATS_BASELINES + NEURAL_BASELINES


class BaselineUnavailable(VqextError):
    """A baseline whose library is not installed."""


def statsforecast_available() -> bool:
    return importlib.util.find_spec("statsforecast") is not None


def neuralforecast_available() -> bool:
    return importlib.util.find_spec("neuralforecast") is not None


def _builtin_available(name: str) -> bool:
    return neuralforecast_available() if name in NEURAL_BASELINES else statsforecast_available()


def _require_builtin(name: str) -> None:
    if name in NEURAL_BASELINES and not neuralforecast_available():
        raise BaselineUnavailable(f"the {name} baseline needs neuralforecast: {NEURAL_HINT}")
    if name in STATS_BASELINES:
        _require_statsforecast(name)


def _require_statsforecast(what: str):
    if not statsforecast_available():
        raise BaselineUnavailable(f"the {what} baseline needs statsforecast, the optional extra: {EXTRA_HINT}")
    import statsforecast.models

    return statsforecast.models


def _forecast_frame(out: pd.DataFrame) -> pd.DataFrame:
    """A Nixtla library's forecast (``unique_id, ds, <model>``) as ``unique_id, step, y_hat``."""
    if "unique_id" not in out.columns:  # statsforecast < 2 and older neuralforecast: the id is the index
        out = out.reset_index()
    value = [c for c in out.columns if c not in ("unique_id", "ds", "index")][0]
    out = out.rename(columns={value: "y_hat"})
    out["step"] = out.groupby("unique_id", sort=False).cumcount() + 1
    return out[["unique_id", "step", "y_hat"]].reset_index(drop=True)


class StatsForecastBaseline:
    """One statsforecast model, fitted on each history it forecasts from (one process: n_jobs=1)."""

    refits = True

    def __init__(self, model, name: str):
        self.model = model
        self.name = name
        self._train: pd.DataFrame | None = None

    def fit(self, train: pd.DataFrame) -> "StatsForecastBaseline":
        self._train = train
        return self

    def warmup(self) -> None:
        """Compile (numba) and import once on a tiny series, so timed runs measure the forecasting."""
        import numpy as np

        n = 4 * max(getattr(self.model, "season_length", 1), 2) + 8
        tiny = pd.DataFrame({"unique_id": "warmup", "ds": np.arange(n), "y": 10 + np.sin(np.arange(n))})
        self.predict(2, history=tiny)

    def predict(self, h: int, history: pd.DataFrame | None = None) -> pd.DataFrame:
        from statsforecast import StatsForecast

        df = self._train if history is None else history
        if df is None:
            raise RuntimeError(f"baseline {self.name}: predict before fit")
        sf = StatsForecast(models=[self.model], freq=1, n_jobs=1)
        return _forecast_frame(sf.forecast(df=df[["unique_id", "ds", "y"]], h=h))


# The factories behind vqext's own entry points (pyproject.toml, group vqext.baselines).
def naive(season: int = 1) -> StatsForecastBaseline:
    return StatsForecastBaseline(_require_statsforecast("naive").Naive(), "naive")


def seasonal_naive(season: int = 1) -> StatsForecastBaseline:
    models = _require_statsforecast("snaive")
    return StatsForecastBaseline(models.SeasonalNaive(season_length=season), "snaive")


def auto_ets(season: int = 1) -> StatsForecastBaseline:
    return StatsForecastBaseline(_require_statsforecast("AutoETS").AutoETS(season_length=season), "AutoETS")


def auto_theta(season: int = 1) -> StatsForecastBaseline:
    return StatsForecastBaseline(_require_statsforecast("AutoTheta").AutoTheta(season_length=season), "AutoTheta")


def auto_arima(season: int = 1) -> StatsForecastBaseline:
    return StatsForecastBaseline(_require_statsforecast("AutoARIMA").AutoARIMA(season_length=season), "AutoARIMA")


class NeuralForecastBaseline:
    """One neuralforecast model, trained once, globally, on the first history it is given (like
    vqext's model without ``--refit``), then forecasting from every window's own history. It is
    built at the first ``predict``, when the horizon is known: neuralforecast models are made for one."""

    refits = False

    def __init__(self, make_model, name: str):
        self.make_model = make_model  # horizon -> a neuralforecast model
        self.name = name
        self._train: pd.DataFrame | None = None
        self._fitted = None  # (horizon, NeuralForecast)

    def fit(self, train: pd.DataFrame) -> "NeuralForecastBaseline":
        self._train, self._fitted = train, None
        return self

    def _quiet(self):
        import logging

        for logger in ("pytorch_lightning", "lightning", "lightning.pytorch", "lightning_fabric"):
            logging.getLogger(logger).setLevel(logging.ERROR)

    def predict(self, h: int, history: pd.DataFrame | None = None) -> pd.DataFrame:
        if self._train is None:
            raise RuntimeError(f"baseline {self.name}: predict before fit")
        self._quiet()
        with warnings.catch_warnings():
            # lightning's deprecation notices are about its own internals, not about this use
            warnings.filterwarnings("ignore", module=r"(pytorch_)?lightning")
            from neuralforecast import NeuralForecast

            if self._fitted is None or self._fitted[0] != h:
                nf = NeuralForecast(models=[self.make_model(h)], freq=1)
                nf.fit(df=self._train[["unique_id", "ds", "y"]])
                self._fitted = (h, nf)
            df = self._train if history is None else history
            return _forecast_frame(self._fitted[1].predict(df=df[["unique_id", "ds", "y"]]))


def nhits(season: int = 1) -> NeuralForecastBaseline:
    """neuralforecast's NHITS with its defaults, a window of three horizons, windows scaled robustly
    (one model for series of any level) and short histories padded; seed 1, CPU or GPU as available."""
    _require_builtin("NHITS")

    def make(h: int):
        from neuralforecast.models import NHITS

        return NHITS(h=h, input_size=3 * h, scaler_type="robust", start_padding_enabled=True, random_seed=1,
                     enable_progress_bar=False, enable_model_summary=False, logger=False)

    return NeuralForecastBaseline(make, "NHITS")


def available_baselines() -> list[str]:
    """Registered baselines that can run here: vqext's own when statsforecast is installed, and
    every plugin baseline that loads."""
    from . import registry

    out = []
    for name in registry.list_baselines():
        entry = registry._lookup("baseline", name)
        if entry.builtin and not _builtin_available(name):
            continue
        try:
            entry.load()
        except VqextError:
            continue
        out.append(name)
    # vqext's own in their documented order, then plugins by name
    return sorted(out, key=lambda n: (BUILTIN_BASELINES.index(n) if n in BUILTIN_BASELINES else len(BUILTIN_BASELINES), n))


def resolve_baselines(spec: str | None) -> tuple[list[str], str | None]:
    """Names from ``--baselines`` (comma-separated; None: every available one, ``none``: none) and
    a note to show the user when vqext's own baselines are missing for lack of the extra."""
    from . import registry

    note = None if statsforecast_available() else f"statsforecast baselines skipped: {EXTRA_HINT}"
    if spec is None:
        return available_baselines(), note
    names = [n.strip() for n in spec.split(",") if n.strip()]
    if names == ["none"] or not names:
        return [], None
    for name in names:
        registry._lookup("baseline", name)  # one clear line for an unknown name
        if name in BUILTIN_BASELINES:
            _require_builtin(name)
    return list(dict.fromkeys(names)), None


def make_baseline(name: str, season: int):
    """A fresh forecaster for baseline ``name`` with season length ``season``."""
    from . import registry

    forecaster = registry.get_baseline(name)(season)
    if not (hasattr(forecaster, "fit") and hasattr(forecaster, "predict")):
        raise VqextError(f"baseline {name!r} returned {type(forecaster).__name__}, which has no fit/predict")
    return forecaster


__all__ = ["StatsForecastBaseline", "NeuralForecastBaseline", "BaselineUnavailable", "BUILTIN_BASELINES", "EXTRA_HINT",
           "available_baselines", "resolve_baselines", "make_baseline", "statsforecast_available",
           "neuralforecast_available"]
