"""Reference implementation of the recommended VQ forecaster (issue 6), to be ported to vqext.

Self-contained: model, training and the seed's evaluation protocol in one file.

    python vqformer_ref.py --seed 0            # trains on ../../shared/data/y+w.csv, prints metrics

Model (VQFormer): Linear(1->d) -> depth x [ h += MHSA(LN(h)), causal, RoPE on q/k ;
h += CodebookAttention(LN(h)) = Wo(softmax(Wq h C_h^T * scale) C_h per head) ] -> LN -> Linear(d->1),
plus a causal linear AR skip, and the training tricks measured in FINDINGS.md (residual target,
input noise, extra weight on the last positions, one pushforward pass). See DEFAULTS.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

DEFAULTS = dict(
    # model
    d_model=64, heads=4, depth=2, vocab_size=64, pe="rope", codebook_trained=True,
    codebook_scale=None,  # None: 1/sqrt(head_dim)
    residual=True,  # predict x[t+1] - x[t]; the output adds the input back
    ar_skip=96,  # causal linear filter over the last 96 inputs added to the output (0: none)
    # training
    T=96, epochs=40, batch=32, lr=3e-3, schedule="cosine", warmup=0.05, clip=1.0,
    input_noise=0.10,  # std of Gaussian noise added to training inputs (normalised units)
    last_weight=1.0, last_k=16,  # loss += last_weight * MSE over the last last_k positions
    pushforward=1,  # extra passes on the model's own (detached) one-step predictions as input
)


def rope(x, base=10000.0):
    """Interleaved rotary embedding of x (B, H, T, d) at positions 0..T-1."""
    B, H, T, d = x.shape
    inv = base ** (-torch.arange(0, d // 2, dtype=torch.float32) * 2.0 / d)
    ang = torch.arange(T, dtype=torch.float32)[:, None] * inv
    cos, sin = ang.cos(), ang.sin()
    x0, x1 = x.reshape(B, H, T, d // 2, 2).unbind(-1)
    return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), -1).reshape(B, H, T, d)


class CausalSelfAttention(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.H = heads
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, h):
        B, T, d = h.shape
        q, k, v = self.qkv(h).view(B, T, 3, self.H, d // self.H).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(rope(q), rope(k), v, is_causal=True)
        return self.proj(o.transpose(1, 2).reshape(B, T, d))


class CodebookAttention(nn.Module):
    """Soft VQ per head: softmax(q C_h^T * scale) C_h, codebook (H, K, d/H), N(0,1) init."""

    def __init__(self, d, heads, K, trained=True, scale=None):
        super().__init__()
        self.H = heads
        cb = torch.randn(heads, K, d // heads)
        if trained:
            self.codebook = nn.Parameter(cb)
        else:
            self.register_buffer("codebook", cb)
        self.scale = (d // heads) ** -0.5 if scale is None else scale
        self.q, self.o = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, h):
        B, T, d = h.shape
        q = self.q(h).view(B, T, self.H, -1).transpose(1, 2)
        p = torch.softmax(torch.einsum("bhtd,hkd->bhtk", q, self.codebook) * self.scale, -1)
        out = torch.einsum("bhtk,hkd->bhtd", p, self.codebook)
        return self.o(out.transpose(1, 2).reshape(B, T, d))


class VQFormer(nn.Module):
    def __init__(self, d_model, heads, depth, vocab_size, codebook_trained, codebook_scale, residual,
                 ar_skip=0, **_):
        super().__init__()
        self.residual = residual
        # a linear autoregressive path; missing history at the window start repeats the first value
        self.ar = nn.Conv1d(1, 1, ar_skip) if ar_skip else None
        if self.ar is not None:
            nn.init.zeros_(self.ar.weight)
            nn.init.zeros_(self.ar.bias)
        self.inp = nn.Linear(1, d_model)
        self.blocks = nn.ModuleList()
        for _ in range(depth):
            self.blocks.append(nn.ModuleDict(dict(
                ln1=nn.LayerNorm(d_model), sa=CausalSelfAttention(d_model, heads),
                ln2=nn.LayerNorm(d_model),
                cb=CodebookAttention(d_model, heads, vocab_size, codebook_trained, codebook_scale))))
        self.ln, self.out = nn.LayerNorm(d_model), nn.Linear(d_model, 1)

    def forward(self, x):  # x (B, T) normalised values -> (B, T) next-step predictions
        h = self.inp(x[..., None])
        for b in self.blocks:
            h = h + b["sa"](b["ln1"](h))
            h = h + b["cb"](b["ln2"](h))
        y = self.out(self.ln(h)).squeeze(-1)
        if self.ar is not None:
            L = self.ar.kernel_size[0]
            y = y + self.ar(F.pad(x[:, None], (L - 1, 0), mode="replicate")).squeeze(1)
        return x + y if self.residual else y


# ---------------------------------------------------------------------------------- protocol
def load(path):
    s = np.loadtxt(path, delimiter=",", skiprows=1, usecols=1)
    return s, float(s.mean()), float(s.std())


def windows(z, T):
    idx = np.arange(len(z) - T)[:, None] + np.arange(T)[None]
    return torch.tensor(z[idx], dtype=torch.float32), torch.tensor(z[idx + 1], dtype=torch.float32)


@torch.no_grad()
def regressive_mse(model, path, T):
    s, mu, sd = load(path)
    win, out = torch.tensor((s[:T] - mu) / sd, dtype=torch.float32)[None], []
    for _ in range(len(s) - T):
        nxt = model(win)[:, -1]
        out.append(nxt.item())
        win = torch.cat([win[:, 1:], nxt[:, None]], 1)
    return float(np.mean((np.array(out) * sd + mu - s[T:]) ** 2))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))
    for k, v in DEFAULTS.items():
        kind = (lambda s: s.lower() in ("1", "true", "yes")) if isinstance(v, bool) else (
            type(v) if v is not None else float)
        ap.add_argument("--" + k, type=kind, default=v)
    a = ap.parse_args()
    torch.set_num_threads(1)
    s, mu, sd = load(os.path.join(a.data, "y+w.csv"))
    x, y = windows((s - mu) / sd, a.T)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(42))
    itr, iva = perm[:int(0.8 * len(x))], perm[int(0.8 * len(x)):]
    torch.manual_seed(a.seed)
    model = VQFormer(**vars(a))
    opt = torch.optim.Adam(model.parameters(), lr=a.lr)
    g = torch.Generator().manual_seed(a.seed + 1000)
    steps = math.ceil(len(itr) / a.batch)
    total, step, t0 = steps * a.epochs, 0, time.process_time()
    for ep in range(a.epochs):
        model.train()
        order = itr[torch.randperm(len(itr), generator=g)]
        for b in range(steps):
            ib = order[b * a.batch:(b + 1) * a.batch]
            xb = x[ib] + a.input_noise * torch.randn(x[ib].shape, generator=g)
            w = int(a.warmup * total)
            lr = a.lr * (step + 1) / w if step < w else (
                a.lr * 0.5 * (1 + math.cos(math.pi * (step - w) / max(1, total - w)))
                if a.schedule == "cosine" else a.lr)
            for pg in opt.param_groups:
                pg["lr"] = lr
            pred = model(xb)
            loss = F.mse_loss(pred, y[ib])
            if a.last_weight:
                loss = loss + a.last_weight * F.mse_loss(pred[:, -a.last_k:], y[ib][:, -a.last_k:])
            for _ in range(a.pushforward):  # teach the model to read its own smooth predictions
                pred = model(torch.cat([xb[:, :1], pred.detach()[:, :-1]], 1))
                loss = loss + F.mse_loss(pred, y[ib])
            opt.zero_grad()
            loss.backward()
            if a.clip:
                nn.utils.clip_grad_norm_(model.parameters(), a.clip)
            opt.step()
            step += 1
    train_cpu = time.process_time() - t0
    model.eval()
    with torch.no_grad():
        val = F.mse_loss(model(x[iva]), y[iva]).item()
    res = dict(seed=a.seed, val=val, reg_yw=regressive_mse(model, os.path.join(a.data, "y+w.csv"), a.T),
               reg_wy=regressive_mse(model, os.path.join(a.data, "w+y.csv"), a.T),
               train_cpu_s=train_cpu, cpu_per_epoch=train_cpu / a.epochs)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
