"""Registration of ``torch.ops.vqext.vqformer_decode_step``: a fake kernel for tracing.

The op is VQFormer's whole cached decoding step in one native call (inference only, no autograd);
:meth:`vqext.models.vqformer.VQFormer._decode_native` prepares its arguments. Its specification
is the module path, ``VQFormer.step`` with ``fast_decode = False``, against which the tests compare it.
"""
from __future__ import annotations

import torch

from .. import _native


def _decode_step_fake(x, params, kv, kv_index, inputs, input_index, sizes, scalars, pos):
    return x.new_empty(x.shape)


if _native.native_available() and hasattr(torch.ops.vqext, "vqformer_decode_step"):
    torch.library.register_fake("vqext::vqformer_decode_step")(_decode_step_fake)
