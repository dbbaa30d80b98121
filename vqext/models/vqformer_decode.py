"""VQFormer's cached decoding step as one native call, ``torch.ops.vqext.vqformer_decode_step``.

The op (csrc/models/vqformer/) receives the model's tensors under the model's own names, from
``named_parameters()`` and ``named_buffers()``; its C++ schema (``decode_params.h``) says which
names it reads and with which shapes, and rejects, naming it, any tensor it does not know, any
it misses and any of the wrong shape. So nothing here lists the weights, and a change to the
model's parameters is an error at the first native step until the kernel learns it.

The op covers the soft quantiser without an added encoding (``rope`` or ``none``), on the CPU, one
new position per row at an int position; :func:`native_step` returns None for any other model,
and :meth:`VQFormer.step` then runs the modules. Its specification is the module path, against
which tests/test_decode.py compares it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .. import _native

OP_AVAILABLE = _native.native_available() and hasattr(torch.ops.vqext, "vqformer_decode_step")


def _decode_step_fake(x, weight_names, weights, kv, kv_index, inputs, input_index, pos, *, heads, kv_heads, rope,
                      rope_base, attn_scale, code_scale, eps, residual):
    return x.new_empty(x.shape)


if OP_AVAILABLE:
    torch.library.register_fake("vqext::vqformer_decode_step")(_decode_step_fake)

_NO_INPUTS = torch.empty(0)  # the op's input history when the model has no AR path


@dataclass(frozen=True)
class NativeStep:
    """The op's arguments that do not change from step to step. It holds the model's tensors
    themselves (not copies), so in-place updates (optimisers, ``load_state_dict``) stay visible."""

    weight_names: list[str]
    weights: list[torch.Tensor]
    config: dict
    dtype: torch.dtype
    ar: bool

    def __call__(self, x_t: torch.Tensor, cache) -> torch.Tensor | None:
        """The predictions for ``x_t`` ``(B, 1, 1)``, the cache written in place; None where the op
        does not apply to this call (another dtype or device, per-row positions, or a cache without
        storage yet: its first append sizes it)."""
        if x_t.dtype != self.dtype or x_t.device.type != "cpu" or not isinstance(cache.pos, int):
            return None
        if not cache.allocated():
            return None
        kv, kv_index = cache.reserve_kv(1)
        inputs, input_index = cache.reserve_input() if self.ar else (_NO_INPUTS, [0, 0, 0])
        return torch.ops.vqext.vqformer_decode_step(x_t, self.weight_names, self.weights, kv, kv_index, inputs,
                                                    input_index, cache.pos, **self.config)


def native_step(model) -> NativeStep | None:
    """The native step for ``model`` (a :class:`~vqext.models.vqformer.VQFormer`), or None where the
    op does not cover it: no extension, the hard quantiser, an added encoding, blocks of different
    attention shapes, layer norms without affine weights or of different eps, tensors other than
    all float32 or all float64, or tensors off the CPU."""
    if not OP_AVAILABLE or model.input_pe is not None:
        return None
    blocks = list(model.blocks)
    if not blocks or any(b.quantize.kind != "soft" for b in blocks):
        return None
    norms = [model.norm_out] + [n for b in blocks for n in (b.norm_attn, b.norm_code)]
    if any(n.weight is None or n.bias is None or n.eps != norms[0].eps for n in norms):
        return None
    attn, codes = blocks[0].attn, blocks[0].quantize.codes
    shape = (attn.heads, attn.kv_heads, attn.head_dim, attn.rope, attn.rope_base, codes.scale)
    for b in blocks:
        a, c = b.attn, b.quantize.codes
        if (a.heads, a.kv_heads, a.head_dim, a.rope, a.rope_base, c.scale) != shape or c.heads != a.heads:
            return None
        if not all(isinstance(p, (nn.Linear, nn.Identity)) for p in (b.code_in, b.code_out)):
            return None
    named = dict(model.named_parameters())
    named.update(model.named_buffers())
    # The direct multi-step head reads the last hidden state of a whole window; a one-step decode
    # never uses it, so it is not part of the step's schema.
    named = {k: v for k, v in named.items() if not k.startswith("direct_head.")}
    tensors = list(named.values())
    dtypes = {t.dtype for t in tensors}
    if dtypes not in ({torch.float32}, {torch.float64}) or any(t.device.type != "cpu" for t in tensors):
        return None
    config = dict(heads=attn.heads, kv_heads=attn.kv_heads, rope=attn.rope, rope_base=float(attn.rope_base),
                  attn_scale=attn.head_dim ** -0.5, code_scale=float(codes.scale), eps=float(norms[0].eps),
                  residual=bool(model.residual))
    return NativeStep(list(named), tensors, config, tensors[0].dtype, model.ar_skip is not None)
