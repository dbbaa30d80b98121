"""Layers built on vqext's ops."""
from .quantizer import QuantizerOutput, VectorQuantizer

__all__ = ["VectorQuantizer", "QuantizerOutput"]
