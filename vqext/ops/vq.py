"""nearest_code: nearest-codebook search (Python API of ``torch.ops.vqext.nearest_code``).

The native kernels (CPU: AVX2 / AVX-512 + OpenMP; CUDA when compiled) never build the N x K
distance matrix. Without the extension the pure-PyTorch reference in ``vqext.ops.reference`` runs.

Gradients: none. ``index`` is an integer and ``score`` is returned detached (``requires_grad``
False); a layer that needs a differentiable distance recomputes it from ``codebook[index]``,
which is what :class:`vqext.nn.VectorQuantizer` does.
"""
from __future__ import annotations

import torch

from .. import _native
from .reference import nearest_code_reference

METRICS = ("l2", "ip")
_HALF_DTYPES = (torch.float16, torch.bfloat16)


def _validate(x, codebook, metric: str) -> None:
    """Raise ValueError/TypeError naming the offending argument (the spec's error contract)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"nearest_code: x must be a torch.Tensor, got {type(x).__name__}")
    if not isinstance(codebook, torch.Tensor):
        raise TypeError(f"nearest_code: codebook must be a torch.Tensor, got {type(codebook).__name__}")
    if not isinstance(metric, str) or metric not in METRICS:
        raise ValueError(f"nearest_code: metric must be one of {METRICS}, got {metric!r}")
    if codebook.dim() not in (2, 3):
        raise ValueError(f"nearest_code: codebook must be (K, D) or (H, K, D), got shape {tuple(codebook.shape)}")
    multi = codebook.dim() == 3
    if x.dim() < (2 if multi else 1):
        want = "(..., H, D) for an (H, K, D) codebook" if multi else "(..., D)"
        raise ValueError(f"nearest_code: x must be {want}, got shape {tuple(x.shape)}")
    if x.device != codebook.device:
        raise ValueError(f"nearest_code: x is on {x.device} but codebook is on {codebook.device}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"nearest_code: x must be a floating-point tensor, got {x.dtype}")
    if codebook.dtype != x.dtype:
        raise TypeError(f"nearest_code: codebook dtype {codebook.dtype} must match x dtype {x.dtype}")
    K, D = codebook.shape[-2], codebook.shape[-1]
    if K == 0:
        raise ValueError("nearest_code: codebook is empty (K = 0)")
    if x.shape[-1] != D:
        raise ValueError(f"nearest_code: x has D = {x.shape[-1]} (last dim) but codebook has D = {D}")
    if multi and x.shape[-2] != codebook.shape[0]:
        raise ValueError(f"nearest_code: x has H = {x.shape[-2]} heads (dim -2) but codebook has "
                         f"H = {codebook.shape[0]}")


def nearest_code(x: torch.Tensor, codebook: torch.Tensor, metric: str = "l2"):
    """Nearest codebook entry of every vector in ``x``.

    Args:
        x: ``(..., D)`` with a single codebook, or ``(..., H, D)`` with per-head codebooks.
        codebook: ``(K, D)`` or ``(H, K, D)``; same dtype and device as ``x``.
        metric: ``"l2"`` (index = argmin squared distance, score = that squared distance) or
            ``"ip"`` (index = argmax inner product, score = that inner product).

    Returns:
        ``(index, score)`` of shape ``x.shape[:-1]``: index int64 (ties go to the smallest k),
        score in ``x.dtype``. Both carry no gradient. float32/float64 everywhere (float16/bfloat16
        are searched in float32 on the CPU); float16/bfloat16 accumulate in float32 on CUDA.
        Memory is O(N + K): the N x K distance matrix is never formed.

    Non-finite values: the index is always in ``[0, K)``. A vector of ``x`` holding NaN gets a
    NaN (or inf) score and an unspecified valid index. The native kernels never choose a code
    holding NaN over a finite one; the reference (``torch.min``/``max``) returns the NaN code.
    See docs/reliability.md.
    """
    _validate(x, codebook, metric)
    if x.requires_grad:
        x = x.detach()
    if codebook.requires_grad:
        codebook = codebook.detach()
    if _native.use_native(x, codebook):
        return torch.ops.vqext.nearest_code(x, codebook, metric)
    return nearest_code_reference(x, codebook, metric)


if _native.native_available():
    @torch.library.register_fake("vqext::nearest_code")
    def _nearest_code_fake(x, codebook, metric="l2"):
        # Shapes only: one (index, score) per vector of x; score has x's dtype. Validation runs
        # here too, so a traced or meta call fails as clearly as an eager one.
        _validate(x, codebook, metric)
        out_shape = x.shape[:-1]
        return (x.new_empty(out_shape, dtype=torch.int64), x.new_empty(out_shape))
