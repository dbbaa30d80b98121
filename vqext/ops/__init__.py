"""Python API of vqext's native ops.

Each op dispatches to ``torch.ops.vqext.*`` when the extension is loaded (CPU, and CUDA when
compiled with it) and to its pure-PyTorch reference in ``vqext.ops.reference`` otherwise.
"""
from .attention import apply_rope, rope_attention
from .reference import apply_rope_reference, nearest_code_reference, rope_attention_reference
from .vq import nearest_code

__all__ = [
    "nearest_code", "apply_rope", "rope_attention",
    "nearest_code_reference", "apply_rope_reference", "rope_attention_reference",
]
