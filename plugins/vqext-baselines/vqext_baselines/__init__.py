"""Baselines for vqext, registered only through entry points (see pyproject.toml).

Importing this package does not register anything by itself: vqext discovers the classes through
the ``vqext.architectures`` and ``vqext.positional_encodings`` entry-point groups.
"""
__version__ = "0.1.0"
