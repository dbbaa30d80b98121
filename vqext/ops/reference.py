"""Pure-PyTorch references of the native ops.

These functions are the specification: the native kernels are tested against them, and they are
the fallback when the extension is not available. They favour clarity over speed, but chunk the
work so that memory stays bounded for large inputs.
"""
from __future__ import annotations

import torch

_CHUNK = 2048


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def nearest_code_reference(x: torch.Tensor, codebook: torch.Tensor, metric: str = "l2"):
    """Nearest codebook entry for each vector.

    x ``(..., D)`` with codebook ``(K, D)``, or x ``(..., H, D)`` with codebook ``(H, K, D)``.
    ``l2``: index = argmin_k ||x - c_k||^2, score = that squared distance.
    ``ip``: index = argmax_k <x, c_k>, score = that inner product.
    Ties go to the smallest k. Returns (index int64 of shape ``x.shape[:-1]``, score in x.dtype).
    """
    if metric not in ("l2", "ip"):
        raise ValueError(f"metric must be 'l2' or 'ip', got {metric!r}")
    ct = _compute_dtype(x)
    if codebook.dim() == 2:
        xs = x.reshape(-1, 1, x.shape[-1])
        cb = codebook.unsqueeze(0)
    else:
        H = codebook.shape[0]
        xs = x.reshape(-1, H, x.shape[-1])
        cb = codebook
    xs = xs.detach().to(ct)
    cb = cb.detach().to(ct)
    idx_parts, score_parts = [], []
    for start in range(0, xs.shape[0], _CHUNK):
        xc = xs[start:start + _CHUNK]  # (n, h, D)
        if metric == "l2":
            diff = xc.unsqueeze(2) - cb.unsqueeze(0)  # (n, h, K, D)
            s = diff.pow(2).sum(-1)
            score, idx = s.min(-1)  # min returns the first minimum
        else:
            # Products summed per code, not a matmul: a matmul's blocking may sum two equal codes
            # in different orders, and the tie they form would go to the larger index.
            s = (xc.unsqueeze(2) * cb.unsqueeze(0)).sum(-1)
            score, idx = s.max(-1)
        idx_parts.append(idx)
        score_parts.append(score)
    if xs.shape[0] == 0:
        idx = torch.empty(xs.shape[:2], dtype=torch.int64, device=x.device)
        score = torch.empty(xs.shape[:2], dtype=ct, device=x.device)
    else:
        idx = torch.cat(idx_parts)
        score = torch.cat(score_parts)
    out_shape = x.shape[:-1]
    return idx.reshape(out_shape), score.reshape(out_shape).to(x.dtype)


def rope_angles(positions: torch.Tensor, d: int, base: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape ``positions.shape + (d // 2,)``; pair i turns by pos * base^(-2i/d)."""
    i = torch.arange(d // 2, device=positions.device, dtype=torch.float64)
    inv_freq = torch.pow(torch.tensor(float(base), dtype=torch.float64), -2.0 * i / d)
    ang = positions.to(torch.float64).unsqueeze(-1) * inv_freq
    return ang.cos().to(dtype), ang.sin().to(dtype)


def _positions(offset, batch: int, length: int, device) -> torch.Tensor:
    """Absolute positions ``(batch, length)`` from an int or a per-batch int tensor offset."""
    t = torch.arange(length, device=device, dtype=torch.int64)
    if isinstance(offset, torch.Tensor):
        off = offset.to(device=device, dtype=torch.int64).reshape(-1)
        if off.numel() == 1:
            off = off.expand(batch)
        return off.unsqueeze(1) + t.unsqueeze(0)
    return (t + int(offset)).unsqueeze(0).expand(batch, length)


def apply_rope_reference(x: torch.Tensor, offset=0, base: float = 10000.0) -> torch.Tensor:
    """Rotate interleaved pairs (2i, 2i+1) of x ``(B, H, T, d)`` or ``(B, T, d)`` by
    angle ``(offset + t) * base^(-2i/d)``. ``offset`` is an int or a per-batch int tensor."""
    squeeze = x.dim() == 3
    xx = x.unsqueeze(1) if squeeze else x
    B, _, T, d = xx.shape
    ct = _compute_dtype(x)
    pos = _positions(offset, B, T, x.device)  # (B, T)
    cos, sin = rope_angles(pos, d, base, ct)  # (B, T, d/2)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    xr = xx.to(ct).reshape(B, xx.shape[1], T, d // 2, 2)
    x0, x1 = xr[..., 0], xr[..., 1]
    y = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).reshape(xx.shape)
    y = y.to(x.dtype)
    return y.squeeze(1) if squeeze else y


def rope_attention_reference(q, k, v, *, causal=False, rope_q=False, rope_k=False, q_offset=0,
                             k_offset=0, scale=None, base: float = 10000.0) -> torch.Tensor:
    """softmax(scale * R(q) R(k)^T + mask) v with RoPE and the causal mask at absolute positions.

    q ``(B, Hq, Tq, d)``; k, v ``(Bk, Hk, Tk, d)`` with Bk in {B, 1} and Hq a multiple of Hk
    (query head h reads key/value head h // (Hq // Hk)). Query i sees key j iff
    ``k_offset + j <= q_offset + i`` when causal. A query that sees no key gets zeros.
    Softmax is computed in float32 (float64 for float64 inputs); the result has q's dtype.
    """
    B, Hq, Tq, d = q.shape
    Bk, Hk, Tk, _ = k.shape
    ct = _compute_dtype(q)
    scale = d ** -0.5 if scale is None else float(scale)
    qq, kk, vv = q.to(ct), k.to(ct), v.to(ct)
    if rope_q:
        qq = apply_rope_reference(qq, q_offset, base)
    if rope_k:
        if isinstance(k_offset, torch.Tensor) and Bk == 1 and k_offset.numel() > 1:
            kk = kk.expand(B, -1, -1, -1)  # a shared codebook rotated differently per batch
        kk = apply_rope_reference(kk, k_offset, base)
    group = Hq // Hk
    if group > 1:
        kk = kk.repeat_interleave(group, dim=1)
        vv = vv.repeat_interleave(group, dim=1)
    s = torch.matmul(qq, kk.transpose(-1, -2)) * scale  # (B, Hq, Tq, Tk)
    if causal:
        qpos = _positions(q_offset, B, Tq, q.device)  # (B, Tq)
        kpos = _positions(k_offset, B if isinstance(k_offset, torch.Tensor) else 1, Tk, q.device)
        allowed = (kpos.unsqueeze(1) <= qpos.unsqueeze(2)).unsqueeze(1)  # (B, 1, Tq, Tk)
        visible = allowed.any(-1, keepdim=True)
        s = s.masked_fill(~allowed, float("-inf")).masked_fill(~visible, 0.0)
        p = torch.softmax(s, dim=-1) * visible  # a row with no visible key outputs zeros
    else:
        p = torch.softmax(s, dim=-1)
    return torch.matmul(p, vv).to(q.dtype)
