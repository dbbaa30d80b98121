"""Layers built on vqext's ops."""
from .attention import CausalSelfAttention, CodebookAttention
from .kv_cache import KVCache

__all__ = ["CodebookAttention", "CausalSelfAttention", "KVCache"]
