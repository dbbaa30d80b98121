"""Layers built on vqext's ops."""
from .attention import CausalSelfAttention, CodebookAttention
from .kv_cache import KVCache
from .quantizer import QuantizerOutput, VectorQuantizer

__all__ = ["CodebookAttention", "CausalSelfAttention", "KVCache", "VectorQuantizer", "QuantizerOutput"]
