"""Whole runs: train, evaluate, forecast and plot (``vqext run``), and apply a finished run to
another series (``vqext forecast --origin start``; forecasts of the future are
:func:`vqext.forecasting.forecast`).

A single series gets the seed's report: one-step and regressive forecasts over the series, their
errors and plots. A panel of several series is trained globally; its report is the training
history and, when the run has a horizon, the forecast of every series' future
(``forecast.csv``, ``forecast.png``)."""
from __future__ import annotations

import os
import warnings

import torch

from . import config as C
from . import distributed, plots, provenance
from .checkpoint import load_run
from .data import check_length, noise_floor
from .forecast import codebook_usage, forecast_series
from .errors import DataError
from .forecast_files import write_forecast_files, write_future_files
from .forecasting import Fitted, as_panel, forecast, series_uid
from .io import atomic_write_json
from .models.base import next_value
from .train import build_model, train, window_start_pos, windows_for


def run_experiment(cfg: C.RunConfig, out_root: str = "runs", *, quiet: bool = False,
                   resume_dir: str | None = None, cache: bool | str = "auto", announce=None) -> dict | None:
    """Train, evaluate, forecast (one-step and regressive) and plot; returns the metrics dict
    (None on a torchrun rank other than 0). With ``resume_dir`` the run continues in that
    directory from its last checkpoint."""
    cfg.validate()
    panel = as_panel(cfg.data, cfg.column, **cfg.data_options)
    if len(panel) == 1:
        series = next(iter(panel))
        check_length(len(series), cfg.time_steps, series.source)  # before a run directory exists
    # Windows (and their errors) before a run directory exists.
    dataset = windows_for(cfg, panel, int(cfg.hparams.get("direct_horizon", 0) or 0))
    dist = distributed.setup(distributed.training_device(C.resolve_device(cfg.device)))
    if resume_dir:
        provenance.check_same_data(cfg, panel, provenance.saved_normalizer(resume_dir), dataset.normalizer)
        if dist.is_main:
            provenance.store_extension(resume_dir, cfg)
        run_dir = resume_dir
    else:
        provenance.record_data(cfg, panel)
        check_positions(cfg, dataset)
        run_dir = dist.broadcast(C.new_run_dir(out_root, cfg.label(panel.name)) if dist.is_main else None)
    try:
        if announce is not None and dist.is_main:
            announce(run_dir)
        result = train(cfg, run_dir, resume=bool(resume_dir), quiet=quiet, dataset=dataset)
    except BaseException:
        if not resume_dir and dist.is_main:
            remove_unstarted_run(run_dir)
        raise
    if not dist.is_main:
        return None  # rank 0 alone evaluates, forecasts and writes
    if len(panel) > 1:
        return _report_panel(cfg, run_dir, panel, result, quiet)
    model, ds, history = result.model.cpu(), result.dataset, result.history
    fc = forecast_series(model, cfg.arch, cfg.pe, series.values, cfg.time_steps, positions=cfg.positions,
                         cache=cache, normalizer=ds.normalizer)
    val_idx = torch.as_tensor(ds.val_idx[: 4096])
    usage = codebook_usage(model, ds.x[val_idx], start_pos=window_start_pos(cfg, ds.local_start(val_idx)))
    metrics = _run_metrics(cfg, run_dir, series, result, fc, usage)
    label = os.path.basename(os.path.dirname(run_dir))
    write_forecast_files(run_dir, series, cfg.time_steps, fc, label, metrics)
    plots.plot_losses(history, os.path.join(run_dir, "loss.png"), title=f"{label}: loss")
    plots.plot_codebook_usage(usage, os.path.join(run_dir, "codebook_usage.png"),
                              title=f"{label}: codebook usage on validation windows")
    return metrics


def check_positions(cfg: C.RunConfig, ds) -> None:
    """Run the model once on the window at the furthest position training will use, so that an
    encoding that cannot reach it fails before a run directory exists."""
    model = build_model(cfg)
    starts = ds.local_start(torch.arange(len(ds.starts)))
    last = torch.argmax(starts).reshape(1)
    with torch.no_grad():
        model.eval()
        next_value(model, ds.x[last], start_pos=window_start_pos(cfg, starts[last]))


def remove_unstarted_run(run_dir: str) -> None:
    """Delete a run directory whose training never finished an epoch (and its label folder when empty)."""
    import shutil

    if os.path.exists(os.path.join(run_dir, C.CHECKPOINT_FILE)):
        return
    shutil.rmtree(run_dir, ignore_errors=True)
    try:
        os.rmdir(os.path.dirname(run_dir))
    except OSError:
        pass  # other runs live there


def _run_metrics(cfg: C.RunConfig, run_dir: str, series, result, fc, usage) -> dict:
    ds, history = result.dataset, result.history
    last = history[-1]
    n_train = len(ds.train_idx)
    return {
        "run": run_dir,
        "arch": cfg.arch, "pe": cfg.pe, "hparams": cfg.hparams, "seed": cfg.seed,
        "data": series.source, "column": series.column, "points": len(series), "time_steps": cfg.time_steps,
        "epochs": last["epoch"], "train_loss": last["train_loss"], "val_loss": last["val_loss"],
        "best_val_loss": min(r["val_loss"] for r in history),
        "epoch_used": result.epoch_used,  # keep_best: the epoch whose weights forecast (0: untrained)
        "train_windows": n_train, "val_windows": len(ds.val_idx),
        "train_seconds": round(result.seconds, 3),
        "windows_per_second": n_train * result.epochs_run / result.seconds if result.seconds > 0 else None,
        "forecast": fc.metrics,
        "noise_floor": noise_floor(series.values),
        "normalizer": ds.normalizer.to_dict(),
        "codes_used": [int((c > 0).sum()) for c in usage],
    }


def _report_panel(cfg: C.RunConfig, run_dir: str, panel, result, quiet: bool) -> dict:
    """metrics.json, the loss plot and, with a horizon, every series' future forecast."""
    import time

    ds, history = result.dataset, result.history
    last = history[-1]
    n_train = len(ds.train_idx)
    windows_run = sum(r.get("windows", n_train) for r in history[len(history) - result.epochs_run:])
    metrics = {
        "run": run_dir, "arch": cfg.arch, "pe": cfg.pe, "hparams": cfg.hparams, "seed": cfg.seed,
        "data": panel.source, "series": len(panel), "points": int(ds.lengths.sum()), "time_steps": cfg.time_steps,
        "split": cfg.split, "epochs": last["epoch"], "train_loss": last["train_loss"], "val_loss": last["val_loss"],
        "best_val_loss": min(r["val_loss"] for r in history),
        "epoch_used": result.epoch_used,  # keep_best: the epoch whose weights forecast (0: untrained)
        "train_windows": n_train, "val_windows": len(ds.val_idx), "windows_per_epoch": last.get("windows"),
        "train_seconds": round(result.seconds, 3),
        "windows_per_second": windows_run / result.seconds if result.seconds > 0 else None,
        "scalers": "scalers.csv",
    }
    label = os.path.basename(os.path.dirname(run_dir))
    if cfg.horizon:
        t0 = time.perf_counter()
        fitted = Fitted(result.model.cpu().eval(), cfg, dict(ds.scalers), run_dir, history)
        frame = forecast(fitted, panel, cfg.horizon, progress=not quiet)
        metrics["forecast"] = {"horizon": cfg.horizon, "origin": "end", "normalize": "train",
                               "method": "direct" if fitted.model.direct_horizon else "rollout",
                               "seconds": round(time.perf_counter() - t0, 3)}
        write_future_files(run_dir, panel, frame, f"{label}: {cfg.horizon}-step forecast", cfg.time_steps)
    atomic_write_json(os.path.join(run_dir, C.METRICS_FILE), metrics)
    plots.plot_losses(history, os.path.join(run_dir, "loss.png"), title=f"{label}: loss")
    return metrics


def forecast_out_dir(run_dir: str, series, column, horizon, cache, out: str | None) -> str:
    """Where a forecast's files go: ``out``, which may not be a run directory (its files would be
    replaced), or by default ``RUN/forecasts/<series>-<hash>`` with the hash of the source's
    absolute path (or spec), column, horizon and cache setting, so that different inputs never
    share a folder."""
    import hashlib

    if out is not None:
        real = os.path.realpath(out)
        if os.path.exists(real) and not os.path.isdir(real):
            raise DataError(f"--out {out} exists and is not a directory")
        if real == os.path.realpath(run_dir) or os.path.exists(os.path.join(real, C.CONFIG_FILE)):
            raise DataError(f"--out {out} is a run directory; a forecast there would replace the run's files. "
                            "Choose another folder (default: RUN/forecasts/<series>-<hash>)")
        return out
    source = os.path.abspath(series.source) if provenance.is_file_spec(series.source) else series.source
    key = repr((source, getattr(series, "column", None), column, horizon, bool(cache)))
    return os.path.join(run_dir, "forecasts", f"{C.shorten(series.name, 80)}-{hashlib.sha256(key.encode()).hexdigest()[:10]}")


def forecast_run(run_dir: str, data: str, column=None, horizon: int | None = None, cache: bool = False,
                 out: str | None = None, note=print, normalize: str = "series",
                 data_options: dict | None = None) -> tuple[dict, str]:
    """Apply a finished run to a series the log's way: roll from its first ``T`` points
    (``--origin start``), normalised with the series' own statistics (``normalize="series"``) or
    with those the run saved for it (``"train"``; the series' own when the run never saw it).
    Writes the forecast's files into ``out`` (default ``RUN/forecasts/<series>-<hash>``). Returns (metrics, out)."""
    from .data import Normalizer
    from .forecasting import check_horizon
    from .windows import scalers_from_dict

    cfg, model, ckpt = load_run(run_dir)
    if int(ckpt["epoch"]) < cfg.epochs:
        note(f"note: the run is partly trained ({ckpt['epoch']} of {cfg.epochs} epochs); "
             f"`vqext run --resume {run_dir}` finishes it")
    if horizon is not None:
        check_horizon(horizon, cfg.time_steps)
    panel = as_panel(data, column, **(data_options or {}))
    if len(panel) != 1:
        raise DataError(f"--origin start rolls over one series; {panel.source} has {len(panel)} "
                        "(use --origin end, or pick one with --column)")
    series = next(iter(panel))
    if len(series) < cfg.time_steps + 2:
        raise DataError(f"{series.source} has {len(series)} points; the run was trained on windows of "
                        f"{cfg.time_steps} steps, so forecasting needs at least {cfg.time_steps + 2}")
    out = forecast_out_dir(run_dir, series, column, horizon, cache, out)
    normalizer = None
    if normalize == "train":
        normalizer = scalers_from_dict(ckpt.get("scalers") or {}).get(series_uid(series, 0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fc = forecast_series(model, cfg.arch, cfg.pe, series.values, cfg.time_steps, positions=cfg.positions,
                             horizon=horizon, cache=cache, normalizer=normalizer)
    for w in caught:
        note(f"note: {w.message}")
    used = normalizer or Normalizer.fit(series.values)
    result = {"run": run_dir, "data": series.source, "column": series.column, "points": len(series),
              "normalizer": ("the run's training statistics" if normalizer is not None
                             else "the series' own mean and std"), "scaler": used.to_dict(), **fc.metrics}
    write_forecast_files(out, series, cfg.time_steps, fc, f"{cfg.arch}/{cfg.pe} on {series.name}", result)
    return result, out


def forecast_future_run(run_dir: str, data, column=None, horizon: int | None = None, *, normalize: str = "train",
                        direct: bool | None = None, cache: bool | str = "auto", out: str | None = None,
                        progress: bool = False, data_options: dict | None = None) -> tuple[dict, str]:
    """Forecast the ``horizon`` points after the end of every series of ``data`` with a finished
    run; writes ``forecast.csv``, ``forecast.png`` and ``metrics.json`` into ``out`` (default
    ``RUN/forecasts/<data>``). Returns (a summary, out)."""
    import time

    from .errors import ConfigError
    from .forecasting import load

    fitted = load(run_dir)
    horizon = horizon or fitted.cfg.horizon
    if not horizon:
        raise ConfigError(f"the run {run_dir} was not trained for a horizon; give --horizon H")
    method = None if direct is None else ("direct" if direct else "rollout")
    panel = as_panel(data, column, **(data_options or {}))
    out = forecast_out_dir(run_dir, panel, column, horizon, cache, out)
    t0 = time.perf_counter()
    frame = forecast(fitted, panel, horizon, normalize=normalize, method=method, cache=cache, progress=progress)
    seconds = round(time.perf_counter() - t0, 3)
    used = method or ("direct" if getattr(fitted.model, "direct_horizon", 0) else "rollout")
    known = sum(series_uid(s, i) in fitted.scalers for i, s in enumerate(panel))
    summary = {"run": run_dir, "data": panel.source, "series": len(panel), "horizon": int(horizon), "origin": "end",
               "normalize": normalize, "series_with_saved_statistics": known if normalize == "train" else 0,
               "method": used, "seconds": seconds}
    write_future_files(out, panel, frame, f"{fitted.cfg.arch}/{fitted.cfg.pe} on {panel.name}: {horizon} steps",
                       fitted.cfg.time_steps, metrics=summary)
    return summary, out
