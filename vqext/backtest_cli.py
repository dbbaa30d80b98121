"""``vqext backtest``: a vqext model and the baselines on the same rolling-origin windows."""
from __future__ import annotations

import os
import sys

import click

from .cli import _HPARAM_OPTIONS, DEFAULT_ARCH, _common_training_options, _make_config

MODEL_NAME = "vqext"


class VqextForecaster:
    """vqext's global training and forecasting behind the backtest's forecaster protocol."""

    refits = False  # trained by fit(); predict() only conditions on the longer history

    def __init__(self, cfg, quiet: bool = True):
        self.cfg = cfg
        self.quiet = quiet
        self.fitted = None

    @staticmethod
    def _panel(frame, name: str):
        from .data import Panel

        return Panel.from_frame(frame, "unique_id", "ds", "y", source=name, name=name)

    def fit(self, train):
        from .forecasting import fit

        self.fitted = fit(self.cfg, self._panel(train, "backtest-train"), quiet=self.quiet)
        return self

    def predict(self, h: int, history=None):
        import vqext

        out = vqext.forecast(self.fitted, self._panel(history, "backtest-history"), h)
        return out[["unique_id", "step", "y_hat"]]


def load_frame(spec: str | None, column):
    """The data as a long frame ``unique_id, ds, y`` and a short label."""
    import numpy as np
    import pandas as pd

    from . import data as D

    if hasattr(D, "load_panel"):
        panel = D.load_panel(spec, column=column)
        return panel.to_frame(), panel.name
    series = D.load_series(spec, column)
    return pd.DataFrame({"unique_id": series.name, "ds": np.arange(len(series)), "y": series.values}), series.name


def model_forecaster(arch, pe, seed, freeze_codebook, quiet, kw):
    """A factory of the vqext forecaster that the run options describe, and a label for it."""
    arch = arch or DEFAULT_ARCH
    if pe is None:
        from .registry import get_arch

        pe = getattr(get_arch(arch), "recommended_pe", None) or "none"
    user = {k: kw[k] for k in _HPARAM_OPTIONS if kw.get(k) is not None}
    if freeze_codebook is not None:
        user["freeze_codebook"] = freeze_codebook
    cfg = _make_config(arch, pe, user, kw, seed)
    return (lambda: VqextForecaster(cfg, quiet=quiet)), f"{MODEL_NAME} = {arch}/{pe}, seed {seed}, {cfg.epochs} epochs"


@click.command()
@_common_training_options(sweep=False)
@click.option("--horizon", "-H", type=int, required=True, help="points forecast from each origin.")
@click.option("--windows", "-K", type=int, default=1, show_default=True, help="forecast origins per series.")
@click.option("--step", "-S", type=int, default=None, help="points between origins (default: the horizon).")
@click.option("--season", "-m", type=int, default=None,
              help="season length: MASE's seasonal-naive scale, the baselines' season and OWA's Naive2 "
                   "(default: 1, and no OWA).")
@click.option("--refit/--no-refit", default=False, show_default=True,
              help="train the vqext model again at every origin, or once before the first origin.")
@click.option("--baselines", "baselines_spec", default=None, metavar="LIST",
              help="comma-separated baselines, or none (default: every available one: naive, snaive, AutoETS, "
                   "AutoTheta, AutoARIMA with vqext[baselines], and plugins').")
@click.option("--model/--no-model", "with_model", default=True, show_default=True,
              help="include the vqext model (--no-model: baselines only).")
def backtest(arch, pe, seed, freeze_codebook, quiet, out, cache, horizon, windows, step, season, refit,
             baselines_spec, with_model, **kw):
    """Rolling-origin evaluation of a vqext model against the baselines, on the same windows.

    Window k of K forecasts the H points after origin n - H - (K-1-k)*S of each series (the last
    window ends at the end of the data). Every model sees only the points before each origin.
    Writes OUT/backtest_<data>/<timestamp>/ with backtest.md, summary.csv, per_series.csv,
    per_window.csv, forecasts.csv, errors_by_window.png and forecasts.png.

    \b
    Examples:
      vqext backtest --data bundled:airline --horizon 12 --windows 3 --season 12
      vqext backtest --data bundled:airline -H 12 -K 4 -S 6 -m 12 --refit --epochs 20
      vqext backtest --data bundled:nile -H 10 -K 3 --no-model --baselines naive,AutoTheta
    """
    from . import backtest as B
    from . import backtest_report as R
    from . import baselines as BL
    from .config import new_run_dir

    frame, name = load_frame(kw["data"], kw["column"])
    names, note = BL.resolve_baselines(baselines_spec)
    if note and not quiet:
        click.echo(f"note: {note}", err=True)
    m = season or 1
    forecasters = {}
    label = None
    if with_model:
        factory, label = model_forecaster(arch, pe, seed, freeze_codebook, quiet, kw)
        forecasters[MODEL_NAME] = factory
    for b in names:
        forecasters[b] = lambda b=b: BL.make_baseline(b, m)
    if not forecasters:
        raise click.UsageError("nothing to evaluate: --no-model and no baselines")
    # Checked before the output folder exists, so bad settings leave nothing behind.
    B.check_windows(dict(frame.groupby("unique_id", sort=False).size()), horizon, windows,
                    horizon if step is None else step, m)
    progress = None if quiet else (lambda text: click.echo(text, err=True))
    result = B.run_backtest(frame, forecasters, horizon=horizon, windows=windows, step=step, season=m, refit=refit,
                            progress=progress)
    out_dir = new_run_dir(out, f"backtest_{name}")
    title = f"Backtest on {name}" + (f" ({label})" if label else "")
    paths = R.write(result, out_dir, title=title, with_owa=season is not None)
    with open(paths["backtest.md"], encoding="utf-8") as fh:
        click.echo(fh.read().rstrip())
    click.echo(f"written to {out_dir}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(backtest())
