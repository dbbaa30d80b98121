"""Training loop and checkpoints.

A run directory holds ``config.json`` (the resolved :class:`~vqext.config.RunConfig`),
``metrics.jsonl`` (one line per finished epoch), ``checkpoint.pt`` (written after every epoch) and,
once finished, ``metrics.json`` and plots. Every file is written atomically.

The checkpoint holds everything an exact resume needs: model and optimizer state, the number of
finished epochs, the loss history, the torch (CPU and CUDA), numpy and Python RNG states and the
state of the generator that shuffles the training windows and draws the input noise. The
learning rate is a function of the step count (epoch x steps per epoch), so it resumes exactly too. Resuming after epoch ``e`` therefore
gives the same numbers as an uninterrupted run (CPU, same thread count).

Checkpoint file format: one ASCII header line ``VQEXT-CKPT 1 sha256=<hex> bytes=<n>`` followed by
``n`` bytes written by ``torch.save``. The digest detects truncated or corrupted files; load with
:func:`load_checkpoint` (tensors are mapped to the CPU whatever device wrote them).
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import os
import random
import time
from dataclasses import dataclass

import numpy as np
import torch

from . import config as C
from . import distributed
from . import objectives
from .data import Dataset, check_length, load_series, prepare
from .errors import DataError, VqextError

CHECKPOINT_MAGIC = b"VQEXT-CKPT 1"


class TrainingError(VqextError):
    """Training cannot continue (e.g. the loss became NaN)."""


# ------------------------------------------------------------------------------- checkpoints
def save_checkpoint(path: str, payload: dict) -> None:
    buf = io.BytesIO()
    torch.save(payload, buf)
    body = buf.getvalue()
    header = CHECKPOINT_MAGIC + f" sha256={hashlib.sha256(body).hexdigest()} bytes={len(body)}\n".encode()
    C.atomic_write_bytes(path, header + body)


def load_checkpoint(path: str) -> dict:
    """Read and verify a checkpoint; raises DataError naming the file if it is missing or corrupted."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except FileNotFoundError:
        raise DataError(f"checkpoint not found: {path}") from None
    head, sep, body = raw.partition(b"\n")
    fields = dict(f.split("=", 1) for f in head[len(CHECKPOINT_MAGIC):].decode("ascii", "replace").split() if "=" in f)
    if not sep or not head.startswith(CHECKPOINT_MAGIC) or "sha256" not in fields:
        raise DataError(f"checkpoint {path} is corrupted: not a vqext checkpoint (bad header)")
    if str(len(body)) != fields.get("bytes"):
        raise DataError(f"checkpoint {path} is corrupted: {len(body)} bytes of data, header says {fields.get('bytes')} (truncated?)")
    if hashlib.sha256(body).hexdigest() != fields["sha256"]:
        raise DataError(f"checkpoint {path} is corrupted: checksum mismatch")
    try:
        return torch.load(io.BytesIO(body), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means an unusable file
        raise DataError(f"checkpoint {path} is corrupted: {exc}") from None


def _rng_state(shuffle: torch.Generator) -> dict:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "python": json.dumps(random.getstate()),
        "shuffle": shuffle.get_state(),
    }


def _restore_rng(state: dict, shuffle: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    py = json.loads(state["python"])
    random.setstate((py[0], tuple(py[1]), py[2]))
    shuffle.set_state(state["shuffle"])


def remove_stale_temporaries(run_dir: str) -> None:
    """Delete temporary files that a killed writer left behind (never the files they replace)."""
    for name in os.listdir(run_dir):
        if name.startswith(".") and name.endswith(".tmp"):
            try:
                os.unlink(os.path.join(run_dir, name))
            except OSError:
                pass


def _open_for_resume(run_dir: str, ckpt_path: str) -> dict | None:
    remove_stale_temporaries(run_dir)
    if not os.path.exists(ckpt_path):
        return None  # killed before the first epoch finished: start over in the same directory
    return load_checkpoint(ckpt_path)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------------- training
def build_model(cfg: C.RunConfig):
    from .registry import create_model

    return create_model(cfg.arch, cfg.pe, **cfg.hparams)


def window_start_pos(cfg: C.RunConfig, window_index: torch.Tensor):
    """Absolute position of each window's first step: 0 (``window``) or its index (``series``)."""
    return 0 if cfg.positions == "window" else window_index


@torch.no_grad()
def evaluate(model, ds: Dataset, indices, cfg: C.RunConfig, device, batch_size: int = 1024) -> float:
    """Mean squared error over all steps of the given windows (normalised units)."""
    model.eval()
    idx = torch.as_tensor(indices, dtype=torch.long)
    total, count = 0.0, 0
    for b in range(0, len(idx), batch_size):
        sel = idx[b:b + batch_size]
        x, y = ds.x[sel].to(device), ds.y[sel].to(device)
        pred = model(x, start_pos=window_start_pos(cfg, sel.to(device)))
        total += float(torch.sum((pred.float() - y) ** 2))
        count += y.numel()
    return total / max(count, 1)


@dataclass
class TrainResult:
    model: torch.nn.Module
    dataset: Dataset
    history: list
    seconds: float
    epochs_run: int  # epochs trained by this call (fewer than history after a resume)


def train(cfg: C.RunConfig, run_dir: str, *, resume: bool = False, quiet: bool = False,
          stop_after_epoch: int | None = None) -> TrainResult:
    """Train ``cfg`` writing into ``run_dir``; with ``resume`` continue from its checkpoint.

    ``stop_after_epoch`` ends the loop early after that epoch (used by tests of resume).
    """
    cfg.validate()
    device = distributed.training_device(C.resolve_device(cfg.device))
    dist = distributed.setup(device)  # single process: a no-op context
    quiet = quiet or not dist.is_main
    ds = prepare(load_series(cfg.data, cfg.column), cfg.time_steps, cfg.split, cfg.val_fraction, cfg.split_seed)
    seed_everything(cfg.seed)
    model = build_model(cfg).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    # A model with nothing to train (a naive baseline) is only evaluated.
    optimizer = torch.optim.Adam(params, lr=cfg.lr) if params else None
    shuffle = torch.Generator().manual_seed(cfg.seed)
    history: list[dict] = []
    start_epoch = 0
    ckpt_path = os.path.join(run_dir, C.CHECKPOINT_FILE)
    # Rank 0 reads the checkpoint and sends it to the others (no shared file system needed).
    ckpt = dist.broadcast_call(lambda: _open_for_resume(run_dir, ckpt_path)) if resume else None
    resume = ckpt is not None
    if resume:
        model.load_state_dict(ckpt["model"])
        if optimizer is not None:
            optimizer.load_state_dict(ckpt["optimizer"])
        history = [json.loads(line) for line in ckpt["history"]]
        start_epoch = int(ckpt["epoch"])
        _restore_rng(ckpt["rng"], shuffle)
    elif dist.is_main:
        C.atomic_write_json(os.path.join(run_dir, C.CONFIG_FILE), cfg.to_dict())
    net = dist.wrap(model, device)  # what runs the training forward (DDP under torchrun)

    train_idx = torch.as_tensor(ds.train_idx, dtype=torch.long)
    x_all, y_all = ds.x.to(device), ds.y.to(device)
    steps_per_epoch = math.ceil(len(train_idx) / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    t0 = time.perf_counter()
    epochs = range(start_epoch, cfg.epochs)
    bar = None
    if not quiet:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.epochs, initial=start_epoch, desc=f"{cfg.arch}/{cfg.pe}", unit="epoch",
                   dynamic_ncols=True, leave=True)
    try:
        for epoch in epochs:
            model.train()
            order = train_idx[torch.randperm(len(train_idx), generator=shuffle)]
            loss_sum, seen = 0.0, 0
            for b in range(0, len(order), cfg.batch_size):
                batch = order[b:b + cfg.batch_size]
                # Noise is drawn for the whole global batch so every rank's generator stays in step.
                noise = objectives.input_noise((len(batch), *x_all.shape[1:]), cfg.input_noise, shuffle)
                sel, weight = dist.split_batch(batch)  # (whole batch, 1.0) in a single process
                x, y = x_all[sel.to(device)], y_all[sel.to(device)]
                if noise is not None:
                    x = x + dist.split_batch(noise)[0].to(x.device, x.dtype)
                step = epoch * steps_per_epoch + b // cfg.batch_size
                with torch.set_grad_enabled(optimizer is not None):
                    loss = objectives.training_loss(net, x, y, window_start_pos(cfg, sel.to(device)), cfg,
                                                    aux_source=model)
                batch_loss = dist.weighted_mean(float(loss.detach()), weight)  # the global batch's
                if not math.isfinite(batch_loss):
                    raise TrainingError(
                        f"training loss became {batch_loss} at epoch {epoch + 1}, batch {b // cfg.batch_size + 1}; "
                        f"lower --lr (now {cfg.lr:g}) or check the data")
                if optimizer is not None:
                    for group in optimizer.param_groups:
                        group["lr"] = objectives.learning_rate(cfg, step, total_steps)
                    optimizer.zero_grad(set_to_none=True)
                    (loss if weight == 1.0 else loss * weight).backward()
                    if cfg.grad_clip:
                        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                    optimizer.step()
                batch_size = min(cfg.batch_size, len(order) - b)
                loss_sum += batch_loss * batch_size
                seen += batch_size
            val_part = dist.shard(ds.val_idx)
            val_loss = dist.weighted_mean(evaluate(model, ds, val_part, cfg, device), len(val_part))
            record = {"epoch": epoch + 1, "train_loss": loss_sum / seen, "val_loss": val_loss,
                      "seconds": round(time.perf_counter() - t0, 3)}
            history.append(record)
            lines = [json.dumps(r, sort_keys=True) for r in history]
            if dist.is_main:
                save_checkpoint(ckpt_path, {
                    "format": 1, "epoch": epoch + 1, "model": model.state_dict(),
                    "optimizer": optimizer.state_dict() if optimizer is not None else {}, "history": lines,
                    "rng": _rng_state(shuffle), "config": json.dumps(cfg.to_dict()),
                    "normalizer": ds.normalizer.to_dict(),
                })
                C.atomic_write_text(os.path.join(run_dir, C.HISTORY_FILE), "\n".join(lines) + "\n")
            if bar is not None:
                bar.update(1)
                bar.set_postfix(train=f"{record['train_loss']:.4f}", val=f"{val_loss:.4f}")
            if stop_after_epoch is not None and epoch + 1 >= stop_after_epoch:
                break
    finally:
        if bar is not None:
            bar.close()
    return TrainResult(model, ds, history, time.perf_counter() - t0, len(history) - start_epoch)


def load_run(run_dir: str):
    """(config, model on CPU in eval mode, checkpoint) of a finished or interrupted run."""
    cfg = C.RunConfig.from_dict(C.read_json(os.path.join(run_dir, C.CONFIG_FILE), "run config"))
    ckpt = load_checkpoint(os.path.join(run_dir, C.CHECKPOINT_FILE))
    model = build_model(cfg)
    model.load_state_dict(ckpt["model"])
    model.eval()
    return cfg, model, ckpt


def is_finite_number(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


# ------------------------------------------------------------------- a whole run: train + report
def run_experiment(cfg: C.RunConfig, out_root: str = "runs", *, quiet: bool = False,
                   resume_dir: str | None = None, cache: bool | str = "auto", announce=None) -> dict:
    """Train, evaluate, forecast (one-step and regressive) and plot; returns the metrics dict.

    With ``resume_dir`` the run continues in that directory from its last checkpoint.
    """
    from .data import noise_floor
    from .forecast import codebook_usage, forecast_series
    from . import plots

    cfg.validate()
    series = load_series(cfg.data, cfg.column)
    check_length(len(series), cfg.time_steps, series.source)  # before a run directory exists
    dist = distributed.setup(distributed.training_device(C.resolve_device(cfg.device)))
    if resume_dir:
        run_dir = resume_dir
    else:
        run_dir = dist.broadcast(C.new_run_dir(out_root, cfg.label(series.name)) if dist.is_main else None)
    if announce is not None and dist.is_main:
        announce(run_dir)
    result = train(cfg, run_dir, resume=bool(resume_dir), quiet=quiet)
    if not dist.is_main:
        return None  # rank 0 alone evaluates, forecasts and writes
    model, ds, history = result.model.cpu(), result.dataset, result.history
    fc = forecast_series(model, cfg.arch, cfg.pe, series.values, cfg.time_steps, positions=cfg.positions,
                         cache=cache, normalizer=ds.normalizer)
    floor = noise_floor(series.values)
    val_idx = torch.as_tensor(ds.val_idx[: 4096])
    usage = codebook_usage(model, ds.x[val_idx], start_pos=window_start_pos(cfg, val_idx))
    last = history[-1]
    n_train = len(ds.train_idx)
    metrics = {
        "run": run_dir,
        "arch": cfg.arch, "pe": cfg.pe, "hparams": cfg.hparams, "seed": cfg.seed,
        "data": series.source, "column": series.column, "points": len(series), "time_steps": cfg.time_steps,
        "epochs": last["epoch"], "train_loss": last["train_loss"], "val_loss": last["val_loss"],
        "best_val_loss": min(r["val_loss"] for r in history),
        "train_windows": n_train, "val_windows": len(ds.val_idx),
        "train_seconds": round(result.seconds, 3),
        "windows_per_second": n_train * result.epochs_run / result.seconds if result.seconds > 0 else None,
        "forecast": fc.metrics,
        "noise_floor": floor,
        "normalizer": ds.normalizer.to_dict(),
        "codes_used": [int((c > 0).sum()) for c in usage],
    }
    C.atomic_write_json(os.path.join(run_dir, C.METRICS_FILE), metrics)
    write_forecast_csv(os.path.join(run_dir, "forecast.csv"), series.values, cfg.time_steps, fc)
    label = os.path.basename(os.path.dirname(run_dir))
    plots.plot_forecast(series.values, fc.one_step, cfg.time_steps, os.path.join(run_dir, "predict_batch.png"),
                        title=f"{label}: one-step forecast (MSE {fc.metrics['batch']['mse']:.4g})",
                        label="one-step forecast", context=cfg.time_steps, ylabel=series.column)
    plots.plot_forecast(series.values, fc.regressive, cfg.time_steps,
                        os.path.join(run_dir, "predict_regressive.png"),
                        title=f"{label}: regressive forecast, {fc.metrics['horizon']} steps "
                              f"(MSE {fc.metrics['regressive']['mse']:.4g})",
                        label="regressive forecast", context=cfg.time_steps, ylabel=series.column)
    plots.plot_losses(history, os.path.join(run_dir, "loss.png"), title=f"{label}: loss")
    plots.plot_codebook_usage(usage, os.path.join(run_dir, "codebook_usage.png"),
                              title=f"{label}: codebook usage on validation windows")
    return metrics


def write_forecast_csv(path: str, values, time_steps: int, fc) -> None:
    rows = ["index,truth,one_step,regressive"]
    n = max(len(values), time_steps + len(fc.regressive))
    for i in range(n):
        truth = f"{values[i]:.10g}" if i < len(values) else ""
        j = i - time_steps
        one = f"{fc.one_step[j]:.10g}" if 0 <= j < len(fc.one_step) else ""
        reg = f"{fc.regressive[j]:.10g}" if 0 <= j < len(fc.regressive) else ""
        rows.append(f"{i},{truth},{one},{reg}")
    C.atomic_write_text(path, "\n".join(rows) + "\n")
