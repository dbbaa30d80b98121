"""apply_rope / rope_attention: Python API. (Placeholder: reference only until native lands.)"""
from __future__ import annotations

from .reference import apply_rope_reference, rope_attention_reference


def apply_rope(x, offset=0, base: float = 10000.0):
    return apply_rope_reference(x, offset, base)


def rope_attention(q, k, v, *, causal=False, rope_q=False, rope_k=False, q_offset=0, k_offset=0,
                   scale=None, base: float = 10000.0):
    return rope_attention_reference(q, k, v, causal=causal, rope_q=rope_q, rope_k=rope_k,
                                    q_offset=q_offset, k_offset=k_offset, scale=scale, base=base)
