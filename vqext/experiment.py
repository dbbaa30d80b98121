"""Whole runs: train, evaluate, forecast and plot (``vqext run``), and apply a finished run to
another series (``vqext forecast``)."""
from __future__ import annotations

import os
import warnings

import torch

from . import config as C
from . import distributed, plots, provenance
from .checkpoint import load_run
from .data import check_length, load_series, noise_floor, prepare
from .forecast import codebook_usage, forecast_series
from .forecast_files import write_forecast_files
from .errors import DataError
from .train import build_model, train, window_start_pos


def run_experiment(cfg: C.RunConfig, out_root: str = "runs", *, quiet: bool = False,
                   resume_dir: str | None = None, cache: bool | str = "auto", announce=None) -> dict | None:
    """Train, evaluate, forecast (one-step and regressive) and plot; returns the metrics dict
    (None on a torchrun rank other than 0). With ``resume_dir`` the run continues in that
    directory from its last checkpoint."""
    cfg.validate()
    series = load_series(cfg.data, cfg.column)
    check_length(len(series), cfg.time_steps, series.source)  # before a run directory exists
    dataset = prepare(series, cfg.time_steps, cfg.split, cfg.val_fraction, cfg.split_seed)
    dist = distributed.setup(distributed.training_device(C.resolve_device(cfg.device)))
    if resume_dir:
        provenance.check_same_data(cfg, series, provenance.saved_normalizer(resume_dir), dataset.normalizer)
        if dist.is_main:
            provenance.store_extension(resume_dir, cfg)
        run_dir = resume_dir
    else:
        provenance.record_data(cfg, series)
        check_positions(cfg, dataset)
        run_dir = dist.broadcast(C.new_run_dir(out_root, cfg.label(series.name)) if dist.is_main else None)
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
    model, ds, history = result.model.cpu(), result.dataset, result.history
    fc = forecast_series(model, cfg.arch, cfg.pe, series.values, cfg.time_steps, positions=cfg.positions,
                         cache=cache, normalizer=ds.normalizer)
    val_idx = torch.as_tensor(ds.val_idx[: 4096])
    usage = codebook_usage(model, ds.x[val_idx], start_pos=window_start_pos(cfg, val_idx))
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
    last = len(ds.x) - 1
    with torch.no_grad():
        model.eval()
        model(ds.x[last:last + 1], start_pos=window_start_pos(cfg, torch.tensor([last])))


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
        "train_windows": n_train, "val_windows": len(ds.val_idx),
        "train_seconds": round(result.seconds, 3),
        "windows_per_second": n_train * result.epochs_run / result.seconds if result.seconds > 0 else None,
        "forecast": fc.metrics,
        "noise_floor": noise_floor(series.values),
        "normalizer": ds.normalizer.to_dict(),
        "codes_used": [int((c > 0).sum()) for c in usage],
    }


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
    key = repr((source, series.column, column, horizon, bool(cache)))
    return os.path.join(run_dir, "forecasts", f"{C.shorten(series.name, 80)}-{hashlib.sha256(key.encode()).hexdigest()[:10]}")


def forecast_run(run_dir: str, data: str, column=None, horizon: int | None = None, cache: bool = False,
                 out: str | None = None, note=print) -> tuple[dict, str]:
    """Apply a finished run to a series (normalised with that series' own statistics); writes the
    forecast's files into ``out`` (default ``RUN/forecasts/<series>``). Returns (metrics, out)."""
    cfg, model, ckpt = load_run(run_dir)
    if int(ckpt["epoch"]) < cfg.epochs:
        note(f"note: the run is partly trained ({ckpt['epoch']} of {cfg.epochs} epochs); "
             f"`vqext run --resume {run_dir}` finishes it")
    series = load_series(data, column)
    if len(series) < cfg.time_steps + 2:
        raise DataError(f"{series.source} has {len(series)} points; the run was trained on windows of "
                        f"{cfg.time_steps} steps, so forecasting needs at least {cfg.time_steps + 2}")
    out = forecast_out_dir(run_dir, series, column, horizon, cache, out)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fc = forecast_series(model, cfg.arch, cfg.pe, series.values, cfg.time_steps, positions=cfg.positions,
                             horizon=horizon, cache=cache)
    for w in caught:
        note(f"note: {w.message}")
    result = {"run": run_dir, "data": series.source, "column": series.column, "points": len(series),
              "normalizer": "the series' own mean and std", **fc.metrics}
    write_forecast_files(out, series, cfg.time_steps, fc, f"{cfg.arch}/{cfg.pe} on {series.name}", result)
    return result, out
