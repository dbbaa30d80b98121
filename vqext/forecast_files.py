"""The files of a forecast: ``forecast.csv``, ``metrics.json`` and the one-step and regressive
plots. ``vqext run`` writes them into the run directory, ``vqext forecast`` into its output folder."""
from __future__ import annotations

import os

from . import plots
from .config import METRICS_FILE
from .io import atomic_write_json, atomic_write_text


def write_forecast_csv(path: str, values, time_steps: int, fc) -> None:
    """One row per series index: the truth, the one-step and the regressive prediction (blank where none)."""
    rows = ["index,truth,one_step,regressive"]
    n = max(len(values), time_steps + len(fc.regressive))
    for i in range(n):
        truth = f"{values[i]:.10g}" if i < len(values) else ""
        j = i - time_steps
        one = f"{fc.one_step[j]:.10g}" if 0 <= j < len(fc.one_step) else ""
        reg = f"{fc.regressive[j]:.10g}" if 0 <= j < len(fc.regressive) else ""
        rows.append(f"{i},{truth},{one},{reg}")
    atomic_write_text(path, "\n".join(rows) + "\n")


def write_forecast_files(out_dir: str, series, time_steps: int, fc, title: str, metrics: dict | None = None) -> None:
    """``forecast.csv``, the two plots and (when given) ``metrics.json`` of one series' forecast."""
    if metrics is not None:
        atomic_write_json(os.path.join(out_dir, METRICS_FILE), metrics)
    write_forecast_csv(os.path.join(out_dir, "forecast.csv"), series.values, time_steps, fc)
    m = fc.metrics
    plots.plot_forecast(series.values, fc.one_step, time_steps, os.path.join(out_dir, "predict_batch.png"),
                        title=f"{title}: one-step forecast (MSE {m['batch']['mse']:.4g})",
                        label="one-step forecast", context=time_steps, ylabel=series.column)
    plots.plot_forecast(series.values, fc.regressive, time_steps, os.path.join(out_dir, "predict_regressive.png"),
                        title=f"{title}: regressive forecast, {m['horizon']} steps (MSE {m['regressive']['mse']:.4g})",
                        label="regressive forecast", context=time_steps, ylabel=series.column)


def write_future_files(out_dir: str, panel, frame, title: str, time_steps: int, metrics: dict | None = None,
                       limit: int = 12) -> None:
    """``forecast.csv`` (``unique_id, step, ds, y_hat``: the points after each series' end) and
    ``forecast.png`` (the history of up to ``limit`` series, sampled evenly, with their forecasts)."""
    import numpy as np

    from .windows import series_uid

    if metrics is not None:
        atomic_write_json(os.path.join(out_dir, METRICS_FILE), metrics)
    atomic_write_text(os.path.join(out_dir, "forecast.csv"), frame.to_csv(index=False, float_format="%.10g"))
    histories = {}
    for i, s in enumerate(panel):
        ds = getattr(s, "ds", None)
        histories[series_uid(s, i)] = (np.arange(len(s.values)) if ds is None else ds, s.values)
    horizon = int(frame["step"].max()) if len(frame) else 0
    plots.plot_future(histories, frame, os.path.join(out_dir, "forecast.png"), title=title, limit=limit,
                      tail=max(4 * horizon, 2 * time_steps))
