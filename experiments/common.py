"""Shared protocol for the issue-6 forecasting experiments (data, split, training, evaluation).

The protocol matches the seed log (20241223): z-scored series, windows of length T with targets
shifted by one step, random 80/20 split of the windows with a generator seeded 42, validation loss =
normalised MSE over all positions, regressive forecast = free-running rollout from the first T true
points to the end of the series, scored in original units.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field, asdict

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
# shared/ sits beside the clone: <clone>/experiments/../../shared/data
DATA = os.environ.get("VQEXT_DATA", os.path.normpath(os.path.join(HERE, "..", "..", "shared", "data")))


def load_series(name: str) -> np.ndarray:
    path = name if os.path.isabs(name) else os.path.join(DATA, name)
    return np.loadtxt(path, delimiter=",", skiprows=1, usecols=1).astype(np.float64)


class Normaliser:
    def __init__(self, series: np.ndarray):
        self.mean = float(series.mean())
        self.std = float(series.std())

    def __call__(self, x):
        return (x - self.mean) / self.std

    def inverse(self, z):
        return z * self.std + self.mean


def make_windows(z: np.ndarray, T: int):
    n = len(z) - T
    idx = np.arange(n)[:, None] + np.arange(T)[None, :]
    x = torch.tensor(z[idx], dtype=torch.float32)
    y = torch.tensor(z[idx + 1], dtype=torch.float32)
    return x, y


def split(n: int, seed: int = 42, frac: float = 0.8):
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g)
    k = int(frac * n)
    return perm[:k], perm[k:]


@dataclass
class TrainConfig:
    T: int = 96
    epochs: int = 50
    batch: int = 32
    lr: float = 7e-3
    weight_decay: float = 0.0
    schedule: str = "const"  # const | cosine
    warmup: float = 0.0  # fraction of steps
    clip: float = 0.0
    input_noise: float = 0.0  # std (normalised units) of Gaussian noise on training inputs
    loss_last: int = 0  # 0: mean over all positions; k: only the last k positions
    last_weight: float = 0.0  # extra loss term: last_weight * MSE over the last last_k positions
    last_k: int = 16
    max_offset: int = 0  # start_pos augmentation: random absolute offset in [0, max_offset]
    optimizer: str = "adam"
    # pushforward: extra passes where every input after the first is replaced by the model's own
    # (detached) one-step prediction, so training sees smooth, self-generated windows like a rollout
    pushforward: int = 0


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    w = int(cfg.warmup * total)
    if w and step < w:
        return cfg.lr * (step + 1) / w
    if cfg.schedule == "cosine":
        p = (step - w) / max(1, total - w)
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * p))
    return cfg.lr


def train(model: nn.Module, xtr, ytr, cfg: TrainConfig, seed: int, log_every: int = 0):
    g = torch.Generator().manual_seed(seed + 1000)
    if cfg.optimizer == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    n = xtr.shape[0]
    steps_per_epoch = math.ceil(n / cfg.batch)
    total = steps_per_epoch * cfg.epochs
    step = 0
    t0w, t0c = time.perf_counter(), time.process_time()
    model.train()
    for ep in range(cfg.epochs):
        perm = torch.randperm(n, generator=g)
        for b in range(steps_per_epoch):
            ib = perm[b * cfg.batch:(b + 1) * cfg.batch]
            xb, yb = xtr[ib], ytr[ib]
            if cfg.input_noise > 0:
                xb = xb + cfg.input_noise * torch.randn(xb.shape, generator=g)
            off = None
            if cfg.max_offset > 0:
                off = torch.randint(0, cfg.max_offset + 1, (xb.shape[0],), generator=g)
            for pg in opt.param_groups:
                pg["lr"] = lr_at(step, total, cfg)
            pred = model(xb, offset=off)
            if cfg.loss_last:
                loss = F.mse_loss(pred[:, -cfg.loss_last:], yb[:, -cfg.loss_last:])
            else:
                loss = F.mse_loss(pred, yb)
            if cfg.last_weight:
                loss = loss + cfg.last_weight * F.mse_loss(pred[:, -cfg.last_k:], yb[:, -cfg.last_k:])
            xin = xb
            for _ in range(cfg.pushforward):
                xin = torch.cat([xin[:, :1], pred.detach()[:, :-1]], dim=1)
                pred = model(xin, offset=off)
                loss = loss + F.mse_loss(pred, yb)
            aux = getattr(model, "aux_loss", None)
            if aux is not None:
                loss = loss + aux
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
            opt.step()
            step += 1
        if log_every and (ep + 1) % log_every == 0:
            print(f"  epoch {ep+1} loss {loss.item():.5f}", flush=True)
    return time.perf_counter() - t0w, time.process_time() - t0c


@torch.no_grad()
def val_loss(model, xva, yva) -> float:
    model.eval()
    return F.mse_loss(model(xva), yva).item()


@torch.no_grad()
def regressive(model, z: np.ndarray, T: int) -> np.ndarray:
    """Free-running forecast: start from z[:T], predict, append, slide; returns z_hat[T:]."""
    model.eval()
    win = torch.tensor(z[:T], dtype=torch.float32)[None]
    out = []
    for _ in range(len(z) - T):
        nxt = model(win)[:, -1]
        out.append(nxt.item())
        win = torch.cat([win[:, 1:], nxt[:, None]], dim=1)
    return np.array(out)


def evaluate_series(model, name: str, T: int):
    s = load_series(name)
    nm = Normaliser(s)
    pred = nm.inverse(regressive(model, nm(s), T))
    mse = float(np.mean((pred - s[T:]) ** 2))
    return mse, pred


def run(make_model, tcfg: TrainConfig, seed: int, train_name="y+w.csv", other_name="w+y.csv",
        keep_preds=False):
    """Train on train_name with the protocol and return a metrics dict."""
    torch.set_num_threads(1)
    s = load_series(train_name)
    nm = Normaliser(s)
    z = nm(s)
    x, y = make_windows(z, tcfg.T)
    itr, iva = split(x.shape[0])
    torch.manual_seed(seed)
    model = make_model()
    nparams = sum(p.numel() for p in model.parameters() if p.requires_grad)
    wall, cpu = (0.0, 0.0)
    if tcfg.epochs > 0 and nparams > 0:
        wall, cpu = train(model, x[itr], y[itr], tcfg, seed)
    vl = val_loss(model, x[iva], y[iva])
    t0 = time.process_time()
    mse_yw, pred_yw = evaluate_series(model, train_name, tcfg.T)
    mse_wy, pred_wy = evaluate_series(model, other_name, tcfg.T)
    res = dict(seed=seed, val=vl, reg_yw=mse_yw, reg_wy=mse_wy, train_wall_s=wall, train_cpu_s=cpu,
               cpu_per_epoch=cpu / max(1, tcfg.epochs), eval_cpu_s=time.process_time() - t0,
               params=nparams)
    if keep_preds:
        res["pred_yw"] = pred_yw.tolist()
        res["pred_wy"] = pred_wy.tolist()
    return res, model


def append_jsonl(path, rec):
    with open(path, "a") as f:
        f.write(json.dumps(rec) + "\n")


def read_jsonl(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(l) for l in f if l.strip()]
