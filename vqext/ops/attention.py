"""apply_rope / rope_attention: Python API of the fused native attention ops.

Both validate their arguments here (errors name the argument), then run ``torch.ops.vqext.*``
when the extension serves the tensors' device and dtype, else the pure-PyTorch references in
:mod:`vqext.ops.reference`, which are the specification. Autograd, fake (meta) kernels and
``torch.compile`` support are registered through ``torch.library``.
"""
from __future__ import annotations

import torch

from .. import _native
from .reference import apply_rope_reference, rope_attention_reference

__all__ = ["apply_rope", "rope_attention"]

_CPU_DTYPES = (torch.float32, torch.float64)
_CUDA_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_ROPE_CPU_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_MAX_HEAD_SIZE = 128


# ----------------------------------------------------------------------------------------------
# argument checks
def _check_tensor(name: str, t, dims: tuple[int, ...], layout: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() not in dims:
        raise ValueError(f"{name} must have shape {layout} ({' or '.join(map(str, dims))} dims), "
                         f"got {tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")


def _split_offset(name: str, offset, batch: int, device: torch.device):
    """(int part, tensor part or None) of an offset given as a Python int or an int tensor."""
    if isinstance(offset, torch.Tensor):
        if offset.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
            raise TypeError(f"{name} must be an int or an integer tensor, got a tensor of dtype {offset.dtype}")
        if offset.dim() > 1 or offset.numel() not in (1, batch):
            raise ValueError(f"{name} must hold one offset or one per batch element ({batch}), "
                             f"got shape {tuple(offset.shape)}")
        if offset.device != device and offset.device.type != "cpu":
            raise ValueError(f"{name} is on {offset.device} but the inputs are on {device}")
        return 0, offset.to(device=device, dtype=torch.int64).reshape(-1)
    if isinstance(offset, bool) or not isinstance(offset, int):
        try:
            import numpy as np  # numpy integers are fine

            if isinstance(offset, np.integer):
                return int(offset), None
        except ImportError:  # pragma: no cover
            pass
        raise TypeError(f"{name} must be an int or an integer tensor, got {type(offset).__name__}")
    if not -(2**63) <= offset < 2**63:
        raise ValueError(f"{name}={offset} does not fit the kernels' 64-bit integer positions "
                         f"(|{name}| must be below 2**63; RoPE is exact only below 2**{_EXACT_POSITION_BITS})")
    return int(offset), None


#: RoPE angles are position x frequency in float64; beyond 2**40 the angle's rounding error passes
#: 1e-4 radians and results drift away from those of the same window at position 0.
_EXACT_POSITION_BITS = 40


class PrecisionWarning(RuntimeWarning):
    """RoPE positions so large that the rotation angles lose precision."""


def _warn_far_positions(name: str, off: int, offs) -> None:
    """Warn when a RoPE offset passes 2**40 (tensor offsets are checked when on the CPU, where
    reading them costs no device synchronisation)."""
    far = abs(off)
    if offs is not None and offs.device.type == "cpu" and offs.numel():
        far = max(far, int(offs.abs().max()))
    if far > 2**_EXACT_POSITION_BITS:
        import warnings

        warnings.warn(f"{name} reaches position {far} (> 2**{_EXACT_POSITION_BITS}): RoPE angles lose "
                      f"precision there and results drift from those at small offsets; keep positions "
                      f"below 2**{_EXACT_POSITION_BITS} (e.g. subtract a common offset from q_offset and k_offset, "
                      f"which leaves causal masks and relative encodings unchanged)", PrecisionWarning, stacklevel=3)


def _check_base(base) -> float:
    base = float(base)
    if not base > 0.0:
        raise ValueError(f"base must be positive, got {base}")
    return base


def _native_ok(dtypes_cpu, *tensors: torch.Tensor) -> bool:
    if not _native.use_native(*tensors):
        return False
    dev = tensors[0].device.type
    allowed = _CUDA_DTYPES if dev == "cuda" else dtypes_cpu
    return tensors[0].dtype in allowed


# ----------------------------------------------------------------------------------------------
# apply_rope
def apply_rope(x: torch.Tensor, offset=0, base: float = 10000.0) -> torch.Tensor:
    """Rotate interleaved pairs (2i, 2i+1) of ``x`` ``(B, H, T, d)`` or ``(B, T, d)`` by angle
    ``(offset + t) * base^(-2i/d)``. ``offset``: a Python int or a per-batch integer tensor.

    A pair holding NaN or inf comes out non-finite (inf * 0 is NaN); other pairs are unaffected."""
    _check_tensor("x", x, (3, 4), "(B, H, T, d) or (B, T, d)")
    d = x.shape[-1]
    if d % 2:
        raise ValueError(f"x's last dim (head size d) must be even, got {d}")
    base = _check_base(base)
    off, offs = _split_offset("offset", offset, x.shape[0], x.device)
    _warn_far_positions("offset", off, offs)
    if not _native_ok(_ROPE_CPU_DTYPES, x):
        return apply_rope_reference(x, offset if offs is None else offs, base)
    return torch.ops.vqext.apply_rope(x, off, offs, base, False)


def _rope_fake(x, offset, offsets, base, inverse):
    return x.new_empty(x.shape)


def _rope_setup(ctx, inputs, output):
    _, ctx.offset, ctx.offsets, ctx.base, ctx.inverse = inputs


def _rope_backward(ctx, grad):
    # R is orthogonal: the gradient turns back by the same angle (R^T)
    g = torch.ops.vqext.apply_rope(grad, ctx.offset, ctx.offsets, ctx.base, not ctx.inverse)
    return g, None, None, None, None


# ----------------------------------------------------------------------------------------------
# rope_attention
def rope_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                   rope_q: bool = False, rope_k: bool = False, q_offset=0, k_offset=0, scale=None,
                   base: float = 10000.0) -> torch.Tensor:
    """``softmax(scale * R(q) R(k)^T + mask) v`` fused: RoPE inside the kernel, causal mask by
    absolute position, grouped heads and batch-broadcast keys/values.

    q ``(B, Hq, Tq, d)``; k, v ``(Bk, Hk, Tk, d)`` with Bk in {B, 1} and Hq a multiple of Hk.
    Query i (position ``q_offset + i``) sees key j (position ``k_offset + j``) iff
    ``k_offset + j <= q_offset + i`` when ``causal``; a query that sees no key outputs zeros.
    Offsets are Python ints or per-batch integer tensors. ``scale`` defaults to ``1/sqrt(d)``.

    Non-finite values: rows whose visible keys, own query and head's values are finite are
    exact. A non-finite value row makes the rows that see it non-finite; rows that mask it out
    too in the reference (masked weights are 0 and 0 * NaN is NaN), some of them in the CPU
    kernels, none on CUDA (docs/reliability.md). A row whose scores are NaN (NaN or inf in its
    query or a visible key) is NaN, in the reference and the kernels alike.
    """
    _check_tensor("q", q, (4,), "(B, Hq, Tq, d)")
    _check_tensor("k", k, (4,), "(Bk, Hk, Tk, d)")
    _check_tensor("v", v, (4,), "(Bk, Hk, Tk, d)")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k and v must share a dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k and v must be on one device, got q {q.device}, k {k.device}, v {v.device}")
    B, Hq, Tq, d = q.shape
    Bk, Hk, Tk, dk = k.shape
    if d % 2 or d == 0 or d > _MAX_HEAD_SIZE:
        raise ValueError(f"q's head size d must be even and in [2, {_MAX_HEAD_SIZE}], got {d}")
    if dk != d:
        raise ValueError(f"k's head size {dk} differs from q's {d}")
    if tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"v must have k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
    if Bk not in (B, 1):
        raise ValueError(f"k and v batch size must be q's ({B}) or 1 (shared), got {Bk}")
    if Hk == 0 or Hq % Hk:
        raise ValueError(f"q's head count {Hq} must be a multiple of k's head count {Hk}")
    q_off, q_offs = _split_offset("q_offset", q_offset, B, q.device)
    k_off, k_offs = _split_offset("k_offset", k_offset, B, q.device)
    if rope_q:
        _warn_far_positions("q_offset", q_off, q_offs)
    if rope_k:
        _warn_far_positions("k_offset", k_off, k_offs)
    if scale is None:
        scale = d ** -0.5
    elif isinstance(scale, torch.Tensor) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    scale = float(scale)
    base = _check_base(base)
    causal, rope_q, rope_k = bool(causal), bool(rope_q), bool(rope_k)
    if not _native_ok(_CPU_DTYPES, q, k, v):
        return rope_attention_reference(q, k, v, causal=causal, rope_q=rope_q, rope_k=rope_k,
                                        q_offset=q_offset if q_offs is None else q_offs,
                                        k_offset=k_offset if k_offs is None else k_offs,
                                        scale=scale, base=base)
    out, _ = torch.ops.vqext.rope_attention_fwd(q, k, v, q_off, q_offs, k_off, k_offs, causal, rope_q,
                                                rope_k, scale, base)
    return out


def _stats_dtype(q: torch.Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _attn_fwd_fake(q, k, v, q_offset, q_offsets, k_offset, k_offsets, causal, rope_q, rope_k, scale, base):
    B, Hq, Tq, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((B, Hq, Tq), dtype=_stats_dtype(q))


def _attn_bwd_fake(grad_out, q, k, v, out, lse, q_offset, q_offsets, k_offset, k_offsets, causal, rope_q,
                   rope_k, scale, base, kv_grad=True):
    if not kv_grad:
        return q.new_empty(q.shape), k.new_empty(0), v.new_empty(0)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _attn_setup(ctx, inputs, output):
    q, k, v, *rest = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.rest = rest  # q_offset, q_offsets, k_offset, k_offsets, causal, rope_q, rope_k, scale, base


def _attn_backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    # A frozen codebook (k, v without gradients) skips the key/value half of the backward.
    kv_grad = bool(ctx.needs_input_grad[1] or ctx.needs_input_grad[2])
    dq, dk, dv = torch.ops.vqext.rope_attention_bwd(grad_out.contiguous(), q, k, v, out, lse, *ctx.rest, kv_grad)
    if not kv_grad:
        dk = dv = None
    return (dq, dk, dv) + (None,) * len(ctx.rest)


if _native.native_available():
    torch.library.register_fake("vqext::apply_rope")(_rope_fake)
    torch.library.register_autograd("vqext::apply_rope", _rope_backward, setup_context=_rope_setup)
    torch.library.register_fake("vqext::rope_attention_fwd")(_attn_fwd_fake)
    torch.library.register_fake("vqext::rope_attention_bwd")(_attn_bwd_fake)
    torch.library.register_autograd("vqext::rope_attention_fwd", _attn_backward, setup_context=_attn_setup)
