"""Attention layers on vqext's fused kernel: the log's soft VQ and causal self-attention."""
from __future__ import annotations

import math

import torch
from torch import nn

from ..ops import apply_rope, nearest_code, rope_attention
from .kv_cache import KVCache


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _head_size(dim: int, heads: int, dim_name: str = "dim") -> int:
    if dim % heads:
        raise ValueError(f"{dim_name} {dim} is not divisible by heads {heads}")
    return dim // heads


class CodebookAttention(nn.Module):
    """Soft vector quantisation: every position attends over a codebook of ``num_codes`` entries.

    ``out = softmax(scale * x C^T) C`` per head, each head with its own codebook ``C`` of shape
    ``(num_codes, dim // heads)``; computed by ``rope_attention(x, C, C)`` with the codebook
    broadcast over the batch, so no ``T x K`` matrix is stored.

    Args:
        num_codes: codebook size K.
        dim: model width; split into ``heads`` heads of ``dim // heads``.
        heads: number of heads (one codebook each).
        scale: score scale; None = ``1 / sqrt(dim // heads)``. The log used ``1 / sqrt(d_model)``
            for all heads, which its models pass explicitly.
        freeze: keep the codebook fixed (a buffer, as in the log, whose codebook never trained).
        init_std: the codebook starts as ``init_std * randn`` (the log: 1).

    ``forward(x, return_indices=False)`` takes ``x`` as ``(B, T, dim)`` or already split into
    heads as ``(B, heads, T, dim // heads)`` and returns the same layout; with
    ``return_indices=True`` it returns ``(out, indices)`` where ``indices`` ``(B, T, heads)`` is
    each position's most attended code (``nearest_code(..., metric="ip")``) for usage statistics.
    """

    def __init__(self, num_codes: int, dim: int, heads: int = 1, scale: float | None = None,
                 freeze: bool = False, init_std: float = 1.0):
        super().__init__()
        self.num_codes = _positive_int("num_codes", num_codes)
        self.dim = _positive_int("dim", dim)
        self.heads = _positive_int("heads", heads)
        self.head_dim = _head_size(dim, heads)
        if scale is not None and not (isinstance(scale, (int, float)) and scale > 0 and math.isfinite(scale)):
            raise ValueError(f"scale must be None or a positive finite number, got {scale!r}")
        self.scale = float(scale) if scale is not None else self.head_dim ** -0.5
        self.frozen = bool(freeze)
        codebook = init_std * torch.randn(self.heads, self.num_codes, self.head_dim)
        if self.frozen:
            self.register_buffer("codebook", codebook)
        else:
            self.codebook = nn.Parameter(codebook)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3 and x.shape[-1] == self.dim:
            B, T, _ = x.shape
            return x.view(B, T, self.heads, self.head_dim).transpose(1, 2)
        if x.dim() == 4 and x.shape[1] == self.heads and x.shape[-1] == self.head_dim:
            return x
        raise ValueError(f"CodebookAttention: x must be (B, T, {self.dim}) or (B, {self.heads}, T, {self.head_dim}), "
                         f"got shape {tuple(x.shape)}")

    def forward(self, x: torch.Tensor, return_indices: bool = False):
        q = self._split(x)
        codebook = self.codebook.to(q.dtype).unsqueeze(0)  # (1, H, K, hd): shared by the batch
        out = rope_attention(q, codebook, codebook, scale=self.scale)
        if x.dim() == 3:
            out = out.transpose(1, 2).reshape(x.shape)
        if not return_indices:
            return out
        # The most attended code is the largest score; the scale is positive, so it is the
        # largest inner product.
        indices, _ = nearest_code(q.detach().transpose(1, 2), self.codebook.detach().to(q.dtype), metric="ip")
        return out, indices

    def extra_repr(self) -> str:
        return (f"num_codes={self.num_codes}, dim={self.dim}, heads={self.heads}, scale={self.scale:.4g}, "
                f"frozen={self.frozen}")


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with optional grouped KV heads and in-kernel RoPE.

    Args:
        d_model: width; ``heads`` query heads of ``d_model // heads``.
        heads: query heads.
        kv_heads: key/value heads (None = ``heads``); ``heads`` must be a multiple of it.
        rope: rotate queries and keys at their absolute positions inside ``rope_attention``.
        rope_base: RoPE frequency base.
        bias: biases in the projections.

    ``forward(x, start_pos=0, cache=None, layer=0)``: ``x`` ``(B, T, d_model)`` at absolute
    positions ``start_pos + t``. With a :class:`KVCache` the positions come from ``cache.pos``
    (``start_pos`` is ignored), the new keys (rotated for RoPE) and values are appended to the
    cache's ``layer`` slot and the queries attend to the cached window plus themselves; the caller
    advances the cache.
    """

    def __init__(self, d_model: int, heads: int, kv_heads: int | None = None, rope: bool = False,
                 rope_base: float = 10000.0, bias: bool = False):
        super().__init__()
        self.d_model = _positive_int("d_model", d_model)
        self.heads = _positive_int("heads", heads)
        self.kv_heads = _positive_int("kv_heads", heads if kv_heads is None else kv_heads)
        if self.heads % self.kv_heads:
            raise ValueError(f"heads {heads} must be a multiple of kv_heads {self.kv_heads}")
        self.head_dim = _head_size(d_model, heads, "d_model")
        if rope and self.head_dim % 2:
            raise ValueError(f"rope needs an even head size: d_model {d_model} / heads {heads} = {self.head_dim}")
        self.rope = bool(rope)
        self.rope_base = float(rope_base)
        # One projection for q, k and v (one matmul per call); its rows are q's, then k's, then v's,
        # initialised exactly as separate q and kv projections would be.
        self.qkv_proj = nn.Linear(d_model, (heads + 2 * self.kv_heads) * self.head_dim, bias=bias)
        self.out_proj = nn.Linear(heads * self.head_dim, d_model, bias=bias)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # checkpoints written before the projections were fused hold q_proj and kv_proj
        for part in ("weight", "bias"):
            q, kv = state_dict.get(f"{prefix}q_proj.{part}"), state_dict.get(f"{prefix}kv_proj.{part}")
            if q is not None and kv is not None and f"{prefix}qkv_proj.{part}" not in state_dict:
                state_dict[f"{prefix}qkv_proj.{part}"] = torch.cat((state_dict.pop(f"{prefix}q_proj.{part}"),
                                                                    state_dict.pop(f"{prefix}kv_proj.{part}")))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def project(self, x: torch.Tensor):
        """``(q, kv)``: q ``(B, heads, T, head_dim)`` and k, v stacked as ``(2, B, kv_heads, T, head_dim)``."""
        B, T, _ = x.shape
        qkv = self.qkv_proj(x)
        split = self.heads * self.head_dim
        q = qkv[..., :split].view(B, T, self.heads, self.head_dim).transpose(1, 2)
        kv = qkv[..., split:].view(B, T, 2, self.kv_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return q, kv

    def forward(self, x: torch.Tensor, start_pos: int | torch.Tensor = 0, cache: KVCache | None = None,
                layer: int = 0) -> torch.Tensor:
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"CausalSelfAttention: x must be (B, T, {self.d_model}), got shape {tuple(x.shape)}")
        B, T, _ = x.shape
        q, kv = self.project(x)
        if cache is None:
            k, v = kv.unbind(0)
            out = rope_attention(q, k, v, causal=True, rope_q=self.rope, rope_k=self.rope,
                                 q_offset=start_pos, k_offset=start_pos, base=self.rope_base)
        else:
            if self.rope:  # cached keys are stored rotated, so no step rotates the window again
                kv = torch.stack((apply_rope(kv[0], cache.pos, self.rope_base), kv[1]))
            kv, k_offset = cache.append_kv(layer, kv)
            k, v = kv[0], kv[1]
            out = rope_attention(q, k, v, causal=True, rope_q=self.rope, rope_k=False,
                                 q_offset=cache.pos, k_offset=k_offset, base=self.rope_base)
        return self.out_proj(out.transpose(1, 2).reshape(B, T, self.heads * self.head_dim))

    def extra_repr(self) -> str:
        return f"heads={self.heads}, kv_heads={self.kv_heads}, head_dim={self.head_dim}, rope={self.rope}"
