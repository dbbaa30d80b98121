"""Models for the issue-6 experiments: the seed's VQLNMLP/MHVQLNMLP, a VQ transformer, baselines."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def rope(x: torch.Tensor, offset=None, base: float = 10000.0) -> torch.Tensor:
    """Interleaved RoPE on x (B, H, T, d) at positions offset + t (offset None, or (B,) ints)."""
    B, H, T, d = x.shape
    pos = torch.arange(T, dtype=torch.float32).expand(B, T)
    if offset is not None:
        pos = pos + offset.to(torch.float32)[:, None]
    inv = base ** (-torch.arange(0, d // 2, dtype=torch.float32) * 2.0 / d)
    ang = pos[..., None] * inv  # (B, T, d/2)
    cos, sin = ang.cos()[:, None], ang.sin()[:, None]
    xr = x.reshape(B, H, T, d // 2, 2)
    x0, x1 = xr[..., 0], xr[..., 1]
    return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), -1).reshape(B, H, T, d)


def sinusoid(n: int, d: int) -> torch.Tensor:
    pos = torch.arange(n, dtype=torch.float32)[:, None]
    div = torch.exp(torch.arange(0, d, 2, dtype=torch.float32) * (-math.log(10000.0) / d))
    pe = torch.zeros(n, d)
    pe[:, 0::2] = torch.sin(pos * div)
    pe[:, 1::2] = torch.cos(pos * div)
    return pe


class AdditivePE(nn.Module):
    """Fixed additive table ('randn': 0.01*randn, 'sinpe': sinusoidal), indexed at offset + t."""

    def __init__(self, kind: str, d: int, max_len: int = 2048):
        super().__init__()
        table = 0.01 * torch.randn(max_len, d) if kind == "randn" else sinusoid(max_len, d)
        self.register_buffer("table", table)

    def forward(self, h, offset=None):
        T = h.shape[1]
        if offset is None:
            return h + self.table[:T]
        idx = offset[:, None] + torch.arange(T)[None]
        return h + self.table[idx]


# ----------------------------------------------------------------------------------- seed models
class SeedVQ(nn.Module):
    """vqlnmlp (heads=1, multihead=False) / mhvqlnmlp: Linear(1->d) -> PE -> LN (per head) ->
    softmax(h C^T / sqrt(d_model)) C with a frozen randn codebook (per head) -> Linear(d->1)."""

    def __init__(self, d=64, K=512, heads=1, pe="none", multihead=False, T=96):
        super().__init__()
        self.d, self.H, self.pe_kind = d, (heads if multihead else 1), pe
        hd = d // self.H
        self.inp = nn.Linear(1, d)
        self.pe = AdditivePE(pe, d) if pe in ("randn", "sinpe") else None
        self.ln = nn.LayerNorm(hd)
        self.register_buffer("codebook", torch.randn(self.H, K, hd))
        self.out = nn.Linear(d, 1)
        self.scale = 1.0 / math.sqrt(d)

    def forward(self, x, offset=None):
        B, T = x.shape
        h = self.inp(x[..., None])
        if self.pe is not None:
            h = self.pe(h, offset)
        h = h.view(B, T, self.H, -1).transpose(1, 2)  # (B, H, T, hd)
        if self.pe_kind == "rope":
            h = rope(h, offset)
        h = self.ln(h)
        p = torch.softmax(torch.einsum("bhtd,hkd->bhtk", h, self.codebook) * self.scale, -1)
        h = torch.einsum("bhtk,hkd->bhtd", p, self.codebook)
        return self.out(h.transpose(1, 2).reshape(B, T, self.d)).squeeze(-1)


# ------------------------------------------------------------------------------------ VQ former
class CausalSelfAttention(nn.Module):
    def __init__(self, d, heads, use_rope=True, causal=True):
        super().__init__()
        self.H, self.use_rope, self.causal = heads, use_rope, causal
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, h, offset=None):
        B, T, d = h.shape
        q, k, v = self.qkv(h).view(B, T, 3, self.H, d // self.H).permute(2, 0, 3, 1, 4)
        if self.use_rope:
            q, k = rope(q, offset), rope(k, offset)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.proj(o.transpose(1, 2).reshape(B, T, d))


class CodebookAttention(nn.Module):
    """Multi-head soft VQ: per head softmax(q C^T * scale) C over a codebook (H, K, hd).
    quantizer='hard' replaces the softmax by the nearest code (l2) with a straight-through
    estimator and a VQ-VAE codebook/commitment loss."""

    def __init__(self, d, heads, K, trained=True, scale=None, quantizer="soft", proj=True,
                 init_std=1.0):
        super().__init__()
        self.H, self.K = heads, K
        hd = d // heads
        cb = torch.randn(heads, K, hd) * init_std
        if trained:
            self.codebook = nn.Parameter(cb)
        else:
            self.register_buffer("codebook", cb)
        self.scale = hd ** -0.5 if scale is None else scale
        self.quantizer = quantizer
        self.q = nn.Linear(d, d) if proj else nn.Identity()
        self.o = nn.Linear(d, d) if proj else nn.Identity()
        self.aux_loss = None

    def forward(self, h):
        B, T, d = h.shape
        q = self.q(h).view(B, T, self.H, -1).transpose(1, 2)  # (B, H, T, hd)
        C = self.codebook
        if self.quantizer == "soft":
            p = torch.softmax(torch.einsum("bhtd,hkd->bhtk", q, C) * self.scale, -1)
            out = torch.einsum("bhtk,hkd->bhtd", p, C)
            self.aux_loss = None
        else:
            dist = (q.pow(2).sum(-1, keepdim=True) - 2 * torch.einsum("bhtd,hkd->bhtk", q, C)
                    + C.pow(2).sum(-1)[None, :, None, :])
            idx = dist.argmin(-1)  # (B, H, T)
            e = torch.stack([C[hh][idx[:, hh]] for hh in range(self.H)], 1)
            if self.training:
                self.aux_loss = F.mse_loss(e, q.detach()) + 0.25 * F.mse_loss(q, e.detach())
            out = q + (e - q).detach()
        return self.o(out.transpose(1, 2).reshape(B, T, d))


class Block(nn.Module):
    def __init__(self, d, heads, cb_heads, K, use_rope, causal, cb_trained, cb_scale, quantizer,
                 proj, self_attn=True, mlp=False):
        super().__init__()
        self.sa = CausalSelfAttention(d, heads, use_rope, causal) if self_attn else None
        self.ln1 = nn.LayerNorm(d)
        self.ln2 = nn.LayerNorm(d)
        self.cb = CodebookAttention(d, cb_heads, K, cb_trained, cb_scale, quantizer, proj)
        self.mlp = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d)) if mlp else None

    def forward(self, h, offset=None):
        if self.sa is not None:
            h = h + self.sa(self.ln1(h), offset)
        h = h + self.cb(self.ln2(h))
        if self.mlp is not None:
            h = h + self.mlp(h)
        return h


class VQFormer(nn.Module):
    """Linear(1->d) [+ additive PE] -> depth x [pre-LN causal MHSA (RoPE on q/k); pre-LN
    multi-head codebook attention] -> LN -> Linear(d->1). residual=True predicts x[t+1]-x[t]."""

    def __init__(self, d=64, heads=4, depth=2, K=64, pe="rope", causal=True, cb_trained=True,
                 cb_scale=None, quantizer="soft", residual=True, cb_heads=None, proj=True,
                 self_attn=True, mlp=False, ar_skip=0):
        super().__init__()
        self.residual = residual
        # ar_skip=L: a causal linear filter over the last L inputs added to the output (a linear
        # autoregressive path); missing history at the start of a window repeats the first value.
        self.ar = nn.Conv1d(1, 1, ar_skip, bias=True) if ar_skip else None
        if self.ar is not None:
            nn.init.zeros_(self.ar.weight)
            nn.init.zeros_(self.ar.bias)
        self.inp = nn.Linear(1, d)
        self.pe = AdditivePE(pe, d) if pe in ("randn", "sinpe") else None
        self.blocks = nn.ModuleList(
            Block(d, heads, cb_heads or heads, K, pe == "rope", causal, cb_trained, cb_scale,
                  quantizer, proj, self_attn, mlp) for _ in range(depth))
        self.ln = nn.LayerNorm(d)
        self.out = nn.Linear(d, 1)

    @property
    def aux_loss(self):
        parts = [b.cb.aux_loss for b in self.blocks if b.cb.aux_loss is not None]
        return sum(parts) if parts else None

    def forward(self, x, offset=None):
        h = self.inp(x[..., None])
        if self.pe is not None:
            h = self.pe(h, offset)
        for b in self.blocks:
            h = b(h, offset)
        y = self.out(self.ln(h)).squeeze(-1)
        if self.ar is not None:
            L = self.ar.kernel_size[0]
            xp = F.pad(x[:, None], (L - 1, 0), mode="replicate")
            y = y + self.ar(xp).squeeze(1)
        return x + y if self.residual else y


# ------------------------------------------------------------------------------------ baselines
class RepeatLast(nn.Module):
    def forward(self, x, offset=None):
        return x


class WindowMean(nn.Module):
    """Prediction at t = mean of x[0..t] (causal running mean of the window)."""

    def forward(self, x, offset=None):
        return x.cumsum(1) / torch.arange(1, x.shape[1] + 1, dtype=x.dtype)


class LSTMModel(nn.Module):
    def __init__(self, hidden=64, layers=2, residual=False):
        super().__init__()
        self.lstm = nn.LSTM(1, hidden, layers, batch_first=True)
        self.out = nn.Linear(hidden, 1)
        self.residual = residual

    def forward(self, x, offset=None):
        h, _ = self.lstm(x[..., None])
        y = self.out(h).squeeze(-1)
        return x + y if self.residual else y
