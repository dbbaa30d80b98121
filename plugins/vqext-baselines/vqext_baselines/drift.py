"""A reference forecaster for `vqext backtest`, registered through the ``vqext.baselines`` entry point.

A baseline entry point names a factory taking the season length and returning a forecaster
(``fit(train)``, ``predict(h, history)``); ``vqext.baselines.StatsForecastBaseline`` wraps any
statsforecast model as one. ``drift`` is statsforecast's random walk with drift: the last value
plus the mean step of the history.
"""
from __future__ import annotations

from vqext.baselines import StatsForecastBaseline, _require_statsforecast


def drift(season: int = 1) -> StatsForecastBaseline:
    return StatsForecastBaseline(_require_statsforecast("drift").RandomWalkWithDrift(), "drift")
