"""Naive forecasters with nothing to train: what any model must beat.

``repeat_last`` predicts that the next value equals the current one; ``window_mean`` predicts the
mean of the window so far (step ``t`` of a window: the mean of its steps ``0..t``; in a
regressive forecast: the mean of the last ``time_steps`` values). Train them with ``--epochs 1``:
vqext only evaluates a model without parameters.
"""
from __future__ import annotations

import torch

from vqext.models.base import ForecastModel


class _Naive(ForecastModel):
    accepted_pes = ("none",)
    supports_cache = False
    defaults = dict(time_steps=96)

    def __init__(self, pe: str = "none", time_steps: int = 96):
        super().__init__()
        self.pe_name = pe

    @staticmethod
    def _check(x):
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != 1:
            raise ValueError(f"x must be (B, T, 1), got {tuple(getattr(x, 'shape', ()))}")


class RepeatLast(_Naive):
    def forward(self, x: torch.Tensor, start_pos: int | torch.Tensor = 0) -> torch.Tensor:
        self._check(x)
        return x.clone()


class WindowMean(_Naive):
    def forward(self, x: torch.Tensor, start_pos: int | torch.Tensor = 0) -> torch.Tensor:
        self._check(x)
        steps = torch.arange(1, x.shape[1] + 1, dtype=x.dtype, device=x.device).view(1, -1, 1)
        return x.cumsum(1) / steps
