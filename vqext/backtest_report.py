"""Tables (markdown, CSV) and PNG plots of a :class:`vqext.backtest.BacktestResult`, written
atomically into one folder."""
from __future__ import annotations

import os

import numpy as np
import pandas as pd

from .backtest import BacktestResult, refit_statement
from .io import atomic_savefig, atomic_write_text

COLUMNS = ("mae", "rmse", "mase", "smape", "owa")
HEADERS = {"mae": "MAE", "rmse": "RMSE", "mase": "MASE", "smape": "sMAPE", "owa": "OWA", "seconds": "seconds", "cpu_seconds": "CPU seconds",
           "model": "model", "unique_id": "series", "refit": "refit at each origin"}
PLOT_SERIES = 4  # series drawn in forecasts.png


def settings_lines(result: BacktestResult, with_owa: bool) -> list[str]:
    n = len(result.series)
    lines = [f"- {n} series, {result.windows} window(s) of horizon {result.horizon}, origins {result.step} points "
             f"apart (the last window ends at each series' end); season {result.season}",
             f"- {refit_statement(result)}",
             f"- MASE: in-sample seasonal-naive scale (season {result.season}) of each window's history; "
             f"means over {n * result.windows} forecasts (series x windows)"]
    lines.append("- OWA relative to Naive2 (M4 definition) on the same windows" if with_owa
                 else "- OWA not shown: give --season to compare with Naive2")
    return lines


def _table(frame: pd.DataFrame, keys: list[str], with_owa: bool) -> tuple[list[str], list[list]]:
    cols = keys + [c for c in COLUMNS if with_owa or c != "owa"] + [c for c in ("seconds", "cpu_seconds") if c in frame]
    return [HEADERS[c] for c in cols], frame[cols].values.tolist()


def markdown(result: BacktestResult, title: str, with_owa: bool = True) -> str:
    from .report import markdown_table

    out = [f"# {title}", "", *settings_lines(result, with_owa), "", "## All series", ""]
    out.append(markdown_table(*_table(result.summary(), ["model"], with_owa)))
    if len(result.series) > 1:
        out += ["", "## Per series", "", markdown_table(*_table(result.per_series(), ["unique_id", "model"], with_owa))]
    return "\n".join(out) + "\n"


def write(result: BacktestResult, out_dir: str, *, title: str, with_owa: bool = True) -> dict[str, str]:
    """Write backtest.md, summary.csv, per_series.csv, per_window.csv, forecasts.csv and two PNGs."""
    drop = [] if with_owa else ["owa"]
    paths = {name: os.path.join(out_dir, name) for name in
             ("backtest.md", "summary.csv", "per_series.csv", "per_window.csv", "forecasts.csv",
              "errors_by_window.png", "forecasts.png")}
    atomic_write_text(paths["backtest.md"], markdown(result, title, with_owa))
    atomic_write_text(paths["summary.csv"], result.summary().drop(columns=drop).to_csv(index=False))
    atomic_write_text(paths["per_series.csv"], result.per_series().drop(columns=drop).to_csv(index=False))
    atomic_write_text(paths["per_window.csv"], result.per_window().drop(columns=drop).to_csv(index=False))
    atomic_write_text(paths["forecasts.csv"], result.forecasts.to_csv(index=False))
    plot_errors_by_window(result, paths["errors_by_window.png"], title)
    plot_forecasts(result, paths["forecasts.png"], title)
    return paths


def _plt():
    from .plots import _plt as plt

    return plt()


def plot_errors_by_window(result: BacktestResult, path: str, title: str) -> None:
    """MASE and sMAPE of each model in each window (mean over series)."""
    plt = _plt()
    per_window = result.per_window()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), dpi=110)
    for ax, metric in zip(axes, ("mase", "smape")):
        for model in result.models:
            part = per_window[per_window.model == model]
            ax.plot(part.window + 1, part[metric], marker="o", label=model)
        ax.set_xlabel("window (origin order)")
        ax.set_ylabel(HEADERS[metric] + (" (%)" if metric == "smape" else ""))
        ax.set_xticks(range(1, result.windows + 1))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{title}: error per window, mean over {len(result.series)} series", fontsize=10)
    fig.tight_layout()
    atomic_savefig(fig, path)
    plt.close(fig)


def sample_series(ids: list[str], k: int = PLOT_SERIES) -> list[str]:
    """``k`` ids spread evenly over the list (all of them when there are few)."""
    if len(ids) <= k:
        return list(ids)
    return [ids[i] for i in np.linspace(0, len(ids) - 1, k).round().astype(int)]


def plot_forecasts(result: BacktestResult, path: str, title: str) -> None:
    """History and every window's forecasts for a sample of series."""
    plt = _plt()
    ids = sample_series(list(result.series))
    fig, axes = plt.subplots(len(ids), 1, figsize=(11, 2.8 * len(ids)), dpi=110, squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, uid in zip(axes[:, 0], ids):
        values = result.series[uid]
        part = result.forecasts[result.forecasts.unique_id == uid]
        first = int(part.origin.min())
        start = max(0, first - 3 * result.horizon)
        ax.plot(np.arange(start, len(values)), values[start:], color="black", lw=1.0, label="truth")
        for i, model in enumerate(result.models):
            for k, (_, w) in enumerate(part[part.model == model].groupby("window")):
                ax.plot(w.origin + w.step - 1, w.y_hat, color=colors[(i + 1) % len(colors)], lw=1.1,
                        label=model if k == 0 else None)
        for origin in sorted(part.origin.unique()):
            ax.axvline(origin - 0.5, color="0.7", lw=0.6, ls="--")
        ax.set_title(str(uid), fontsize=9)
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8, ncol=min(6, len(result.models) + 1))
    axes[-1, 0].set_xlabel("position in series (dashed: forecast origins)")
    fig.suptitle(f"{title}: forecasts", fontsize=10)
    fig.tight_layout()
    atomic_savefig(fig, path)
    plt.close(fig)
