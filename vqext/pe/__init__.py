"""Positional encodings. Each is registered through the ``vqext.positional_encodings`` group."""
from .encodings import NoPE, PositionalEncoding, RandnPE, RoPE, SinusoidalPE, positions

__all__ = ["PositionalEncoding", "NoPE", "RandnPE", "SinusoidalPE", "RoPE", "positions"]
