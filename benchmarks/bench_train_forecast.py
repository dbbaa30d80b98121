"""Training throughput and cached autoregressive forecasting, vqext against plain PyTorch.

1. Training (windows/s), the log's setup (K 512, d 64, T 96, batch 32, Adam lr 0.007, frozen
   codebook, RoPE) for the 1-head (`vqlnmlp`) and 8-head (`mhvqlnmlp`) configurations: the vqext
   model against a plain-PyTorch implementation of the same model (Linear -> eager RoPE ->
   LayerNorm -> matmul-softmax-matmul codebook attention -> Linear), same data, same steps.
2. Regressive forecast of 637 steps at T = 96 (the log's y+w.csv protocol) with a one-layer `vqformer`,
   recomputing each window against the KV cache; the outputs must agree (<= 1e-5 relative). Also
   the default two-layer `vqformer`, for speed only (deeper cached decoding differs by design:
   upper-layer keys keep an older context).

Targets (issue 5): training >= 3x (8 heads) and >= 1.5x (1 head); cache >= 5x.

    python benchmarks/bench_train_forecast.py [--steps 48] [--data ../shared/data/y+w.csv] [--threads N]
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import numpy as np
import torch
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from vqext.data import Normalizer, load_series, make_windows  # noqa: E402
from vqext.forecast import regressive  # noqa: E402
from vqext.registry import create_model  # noqa: E402


# ---------------------------------------------------------------------- the plain-PyTorch model
def eager_rope(x: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Interleaved-pair RoPE on (B, H, T, d), positions 0..T-1, written the usual eager way."""
    T, d = x.shape[-2], x.shape[-1]
    inv = base ** (-torch.arange(0, d, 2, dtype=torch.float32) / d)
    ang = torch.arange(T, dtype=torch.float32)[:, None] * inv[None, :]
    cos, sin = ang.cos(), ang.sin()
    x0, x1 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2)


class PlainVQ(nn.Module):
    """The log's (MH)VQLNMLP with RoPE in plain PyTorch."""

    def __init__(self, vocab_size=512, d_model=64, heads=1):
        super().__init__()
        self.heads, self.d_model, dh = heads, d_model, d_model // heads
        self.inp = nn.Linear(1, d_model)
        self.ln = nn.LayerNorm(dh)
        self.codebook = nn.Parameter(torch.randn(heads, vocab_size, dh), requires_grad=False)
        self.out = nn.Linear(d_model, 1)

    def forward(self, x):
        B, T, _ = x.shape
        h = self.inp(x).view(B, T, self.heads, -1).transpose(1, 2)  # (B, H, T, dh)
        h = self.ln(eager_rope(h))
        scores = torch.matmul(h, self.codebook.transpose(-1, -2)) / math.sqrt(self.d_model)  # the log's scale
        a = torch.matmul(torch.softmax(scores, dim=-1), self.codebook)
        return self.out(a.transpose(1, 2).reshape(B, T, -1))


def train_throughput(model, x, y, steps, batch=32, lr=0.007, warmup=3) -> float:
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    g = torch.Generator().manual_seed(0)
    model.train()

    def step():
        idx = torch.randint(0, x.shape[0], (batch,), generator=g)
        loss = nn.functional.mse_loss(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(warmup):
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch / (time.perf_counter() - t0)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=os.path.join(ROOT, "..", "shared", "data", "y+w.csv"))
    ap.add_argument("--steps", type=int, default=48, help="training steps timed per model (3 seed epochs = 48)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--skip-train", action="store_true")
    ap.add_argument("--skip-forecast", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from vqext import _native

    series = load_series(args.data if os.path.exists(args.data) else "synthetic:sine:733")
    z = Normalizer.fit(series.values).encode(series.values)
    x, y = make_windows(z, 96)
    print(f"data: {series.source} ({len(series)} points, {x.shape[0]} windows); torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, native={_native.native_available()}")
    rows = []
    if not args.skip_train:
        for label, arch, heads, target in (("1 head", "vqlnmlp", None, 1.5), ("8 heads", "mhvqlnmlp", 8, 3.0)):
            torch.manual_seed(0)
            hp = dict(vocab_size=512, d_model=64, time_steps=96, freeze_codebook=True)
            if heads:
                hp["heads"] = heads
            ours = create_model(arch, "rope", **hp)
            torch.manual_seed(0)
            plain = PlainVQ(512, 64, heads or 1)
            base = train_throughput(plain, x, y, args.steps)
            fast = train_throughput(ours, x, y, args.steps)
            rows.append((f"train {arch} rope, {label} (windows/s)", base, fast, fast / base, f">= {target}x",
                         "ok" if fast / base >= target else "BELOW TARGET"))
    if not args.skip_forecast:
        for depth in (1, 2):
            torch.manual_seed(0)
            model = create_model("vqformer", "rope", time_steps=96, depth=depth).eval()
            steps = len(z) - 96
            regressive(model, z[:200], 96, cache=True)  # warm-up
            t0 = time.perf_counter()
            recomputed = regressive(model, z, 96, cache=False)
            t_re = time.perf_counter() - t0
            t0 = time.perf_counter()
            cached = regressive(model, z, 96, cache=True)
            t_ca = time.perf_counter() - t0
            rel = float(np.abs(cached - recomputed).max() / max(np.abs(recomputed).max(), 1e-30))
            if depth == 1:
                status = ("ok" if t_re / t_ca >= 5 and rel <= 1e-5 else "BELOW TARGET") + f", max rel diff {rel:.1e}"
                target = ">= 5x"
            else:
                status, target = f"(speed only) max rel diff {rel:.1e}", "-"
            rows.append((f"forecast vqformer rope depth {depth}, {steps} steps at T=96 (steps/s)", steps / t_re,
                         steps / t_ca, t_re / t_ca, target, status))
    w = max(len(r[0]) for r in rows)
    print(f"\n| {'benchmark':<{w}} | baseline | vqext | ratio | target | status |")
    print(f"|{'-' * (w + 2)}|----------|-------|-------|--------|--------|")
    for name, base, fast, ratio, target, status in rows:
        print(f"| {name:<{w}} | {base:8.1f} | {fast:8.1f} | {ratio:5.2f}x | {target} | {status} |")
    print("\nbaseline: plain PyTorch (training) / recomputing every window (forecast)")


if __name__ == "__main__":
    main()
