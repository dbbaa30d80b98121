"""Architectures. Each is registered through the ``vqext.architectures`` entry-point group."""
from .base import ForecastModel

__all__ = ["ForecastModel"]
