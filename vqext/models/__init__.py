"""Architectures. Each is registered through the ``vqext.architectures`` entry-point group.

The concrete architectures are imported on demand by the registry (``vqext.create_model``), so
importing this package stays cheap.
"""
from .base import ForecastModel

__all__ = ["ForecastModel"]
