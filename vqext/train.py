"""The training loop: epochs over shuffled windows, validation, a checkpoint after every epoch.

Windows come from every series of the data (:mod:`vqext.windows`). An epoch is one pass over the
shuffled training windows or, with ``windows_per_epoch``, that many of them drawn afresh each
epoch: fewer bounds an epoch over large sets such as M4, more repeats them (reshuffled), so that
a recipe is the same number of optimizer steps on a short series as on a large panel.

A run directory holds ``config.json`` (the resolved :class:`~vqext.config.RunConfig`),
``scalers.csv`` (each series' scaling statistics: what forecasts of it use), ``metrics.jsonl``
(one line per finished epoch) and ``checkpoint.pt`` (written after every epoch, with the scalers;
see :mod:`vqext.checkpoint`); :mod:`vqext.experiment` adds ``metrics.json`` and plots once the run
is finished. Every file is written atomically. Training without a run directory writes nothing.
"""
from __future__ import annotations

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
from .checkpoint import kept_best, load_model_state, open_for_resume, restore_rng, rng_state, save_checkpoint
from .windows import WindowSet, build, scalers_to_dict
from .errors import VqextError
from .io import atomic_write_json, atomic_write_text


SCALERS_FILE = "scalers.csv"


class TrainingError(VqextError):
    """Training cannot continue (e.g. the loss became NaN)."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------------- training
def build_model(cfg: C.RunConfig):
    from .registry import create_model

    return create_model(cfg.arch, cfg.pe, **cfg.hparams)


def window_start_pos(cfg: C.RunConfig, local_start: torch.Tensor):
    """Absolute position of each window's first step: 0 (``window``) or its start in its series (``series``)."""
    return 0 if cfg.positions == "window" else local_start


def windows_for(cfg: C.RunConfig, data=None, direct_horizon: int = 0) -> WindowSet:
    """The windows ``cfg`` trains on, from ``data`` (a panel or list of series) or ``cfg.data``."""
    if data is None:
        from .forecasting import as_panel

        data = as_panel(cfg.data, cfg.column, **cfg.data_options)
    return build(data, cfg.time_steps, split=cfg.split, normalize=cfg.normalize, val_fraction=cfg.val_fraction,
                 split_seed=cfg.split_seed, val_size=cfg.val_size, horizon=direct_horizon,
                 forecast_horizon=cfg.horizon)


@torch.no_grad()
def evaluate(model, ds: WindowSet, indices, cfg: C.RunConfig, device, batch_size: int = 1024) -> float:
    """Validation MSE (normalised units) of the given windows.

    Window splits (the seed's): over all steps of each window. ``tail``: over the points of the
    validation tail only, each predicted from the points before it: a window's direct predictions
    when the model has a direct head, else its last one-step prediction.
    """
    model.eval()
    idx = torch.as_tensor(indices, dtype=torch.long)
    total, count = 0.0, 0
    for b in range(0, len(idx), batch_size):
        sel = idx[b:b + batch_size]
        x, y, ahead = ds.gather(sel)
        x, y = x.to(device), y.to(device)
        start = window_start_pos(cfg, ds.local_start(sel).to(device))
        if ahead is not None and (ds.val_last_only or not getattr(model, "one_step", True)):
            pred, y = model(x, start_pos=start, direct=True)[1], ahead.to(device)
        elif ds.val_last_only:
            pred, y = model(x, start_pos=start)[:, -1:], y[:, -1:]
        else:
            pred = model(x, start_pos=start)
        total += float(torch.sum((pred.float() - y) ** 2))
        count += y.numel()
    return total / count if count else float("nan")


@dataclass
class TrainResult:
    model: torch.nn.Module
    dataset: WindowSet
    history: list
    seconds: float
    epochs_run: int  # epochs trained by this call (fewer than history after a resume)
    epoch_used: int = -1  # the epoch whose weights the model holds (0: untrained; keep_best may pick any)


@dataclass
class _State:
    """What the loop carries from epoch to epoch (and what a checkpoint restores)."""
    model: torch.nn.Module
    net: torch.nn.Module             # what runs the training forward (DDP under torchrun)
    params: list
    optimizer: torch.optim.Optimizer | None
    shuffle: torch.Generator         # window order and input noise
    history: list
    start_epoch: int
    best: dict | None = None         # keep_best: {"epoch", "val_loss", "model" (a state dict copy)}


def _initial_state(cfg: C.RunConfig, run_dir: str | None, ds: WindowSet, resume: bool, device, dist) -> _State:
    seed_everything(cfg.seed)
    model = build_model(cfg).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    # A model with nothing to train (a naive baseline) is only evaluated.
    optimizer = torch.optim.Adam(params, lr=cfg.lr) if params else None
    shuffle = torch.Generator().manual_seed(cfg.seed)
    history: list[dict] = []
    start_epoch = 0
    best = None
    ckpt_path = os.path.join(run_dir, C.CHECKPOINT_FILE) if run_dir else None
    # Rank 0 reads the checkpoint and sends it to the others (no shared file system needed).
    ckpt = dist.broadcast_call(lambda: open_for_resume(run_dir, ckpt_path)) if resume and run_dir else None
    if ckpt is not None:
        load_model_state(model, ckpt["model"], ckpt_path)
        if optimizer is not None:
            optimizer.load_state_dict(ckpt["optimizer"])
        history = [json.loads(line) for line in ckpt["history"]]
        start_epoch = int(ckpt["epoch"])
        restore_rng(ckpt["rng"], shuffle)
        best = ckpt.get("best")
    elif dist.is_main and run_dir:
        atomic_write_json(os.path.join(run_dir, C.CONFIG_FILE), cfg.to_dict())
        atomic_write_text(os.path.join(run_dir, SCALERS_FILE), ds.scalers_table())
    return _State(model, dist.wrap(model, device), params, optimizer, shuffle, history, start_epoch, best)


def _note_if_best(st: _State, epoch: int, val_loss: float) -> None:
    """keep_best: remember the model after ``epoch`` (0: before training) if its validation loss is
    the lowest so far. Ties keep the earlier epoch, so an untrained model that is already as good
    (a naive-anchored head) is kept."""
    if math.isfinite(val_loss) and (st.best is None or val_loss < st.best["val_loss"]):
        state = {k: v.detach().clone() for k, v in st.model.state_dict().items()}
        st.best = {"epoch": epoch, "val_loss": val_loss, "model": state}


def epoch_windows(cfg: C.RunConfig, ds: WindowSet) -> int:
    """Training windows per epoch: all of them, or ``windows_per_epoch``."""
    return cfg.windows_per_epoch or len(ds.train_idx)


def draw_windows(train_idx: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` training windows in random order: a prefix of one shuffle, or several shuffles in a
    row when ``count`` is more than there are (so an epoch is the same work on any data size)."""
    rounds = -(-count // len(train_idx))
    return torch.cat([train_idx[torch.randperm(len(train_idx), generator=generator)] for _ in range(rounds)])[:count]


def _train_epoch(st: _State, cfg: C.RunConfig, ds: WindowSet, epoch: int, device, dist) -> tuple[float, int]:
    """One epoch over shuffled training windows; (the mean loss, the windows seen)."""
    train_idx = ds.train_idx
    per_epoch = epoch_windows(cfg, ds)
    steps_per_epoch = math.ceil(per_epoch / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    st.model.train()
    order = draw_windows(train_idx, per_epoch, st.shuffle)
    loss_sum, seen = 0.0, 0
    for b in range(0, len(order), cfg.batch_size):
        batch = order[b:b + cfg.batch_size]
        # Noise is drawn for the whole global batch so every rank's generator stays in step.
        noise = objectives.input_noise((len(batch), ds.time_steps, 1), cfg.input_noise, st.shuffle)
        sel, weight = dist.split_batch(batch)  # (whole batch, 1.0) in a single process
        x, y, ahead = ds.gather(sel)
        x, y = x.to(device), y.to(device)
        if noise is not None:
            x = x + dist.split_batch(noise)[0].to(x.device, x.dtype)
        step = epoch * steps_per_epoch + b // cfg.batch_size
        with torch.set_grad_enabled(st.optimizer is not None):
            loss = objectives.training_loss(st.net, x, y, window_start_pos(cfg, ds.local_start(sel).to(device)), cfg,
                                            aux_source=st.model,
                                            direct_target=None if ahead is None else ahead.to(device))
        batch_loss = dist.weighted_mean(float(loss.detach()), weight)  # the global batch's
        if not math.isfinite(batch_loss):
            raise TrainingError(
                f"training loss became {batch_loss} at epoch {epoch + 1}, batch {b // cfg.batch_size + 1}; "
                f"lower --lr (now {cfg.lr:g}) or check the data")
        if st.optimizer is not None:
            for group in st.optimizer.param_groups:
                group["lr"] = objectives.learning_rate(cfg, step, total_steps)
            st.optimizer.zero_grad(set_to_none=True)
            (loss if weight == 1.0 else loss * weight).backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(st.params, cfg.grad_clip)
            st.optimizer.step()
        batch_size = min(cfg.batch_size, len(order) - b)
        loss_sum += batch_loss * batch_size
        seen += batch_size
    return loss_sum / seen, seen


def _save_epoch(st: _State, cfg: C.RunConfig, ds: WindowSet, run_dir: str, epoch: int) -> None:
    lines = [json.dumps(r, sort_keys=True) for r in st.history]
    save_checkpoint(os.path.join(run_dir, C.CHECKPOINT_FILE), {
        "format": 1, "epoch": epoch + 1, "model": st.model.state_dict(),
        "optimizer": st.optimizer.state_dict() if st.optimizer is not None else {}, "history": lines,
        "rng": rng_state(st.shuffle), "config": json.dumps(cfg.to_dict()), "best": st.best,
        "normalizer": ds.normalizer.to_dict() if ds.normalizer is not None else None,
        "scalers": scalers_to_dict(ds.scalers),
    })
    atomic_write_text(os.path.join(run_dir, C.HISTORY_FILE), "\n".join(lines) + "\n")


def train(cfg: C.RunConfig, run_dir: str | None, *, resume: bool = False, quiet: bool = False,
          stop_after_epoch: int | None = None, dataset: WindowSet | None = None, data=None) -> TrainResult:
    """Train ``cfg`` writing into ``run_dir`` (None: write nothing); with ``resume`` continue from its checkpoint.

    ``dataset`` is the windows when the caller has them already (so the data is read once);
    else they are built from ``data`` (a panel, or a list of series), else from ``cfg.data``.
    ``stop_after_epoch`` ends the loop early after that epoch (used by tests of resume).
    """
    cfg.validate()
    device = distributed.training_device(C.resolve_device(cfg.device))
    dist = distributed.setup(device)  # single process: a no-op context
    quiet = quiet or not dist.is_main
    ds = dataset or windows_for(cfg, data, int(cfg.hparams.get("direct_horizon", 0) or 0))
    st = _initial_state(cfg, run_dir, ds, resume, device, dist)
    t0 = time.perf_counter()
    bar = None
    if not quiet:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.epochs, initial=st.start_epoch, desc=f"{cfg.arch}/{cfg.pe}", unit="epoch",
                   dynamic_ncols=True, leave=True)
    val_part = dist.shard(ds.val_idx)
    if cfg.keep_best and st.start_epoch == 0 and len(ds.val_idx):
        _note_if_best(st, 0, dist.weighted_mean(evaluate(st.model, ds, val_part, cfg, device), len(val_part)))
    try:
        for epoch in range(st.start_epoch, cfg.epochs):
            train_loss, seen = _train_epoch(st, cfg, ds, epoch, device, dist)
            val_loss = dist.weighted_mean(evaluate(st.model, ds, val_part, cfg, device), len(val_part))
            if cfg.keep_best:
                _note_if_best(st, epoch + 1, val_loss)
            st.history.append({"epoch": epoch + 1, "train_loss": train_loss, "val_loss": val_loss, "windows": seen,
                               "seconds": round(time.perf_counter() - t0, 3)})
            if dist.is_main and run_dir:
                _save_epoch(st, cfg, ds, run_dir, epoch)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(train=f"{train_loss:.4f}", val=f"{val_loss:.4f}")
            if stop_after_epoch is not None and epoch + 1 >= stop_after_epoch:
                break
    finally:
        if bar is not None:
            bar.close()
    kept = kept_best(cfg, st.best, len(st.history))
    if kept is not None:
        st.model.load_state_dict(kept["model"])
    return TrainResult(st.model, ds, st.history, time.perf_counter() - t0, len(st.history) - st.start_epoch,
                       int(kept["epoch"]) if kept is not None else len(st.history))
