"""The interface every architecture implements (built-in or plugin).

A model maps a normalised window ``x`` of shape ``(B, T, 1)`` to next-step predictions of the
same shape: output ``t`` predicts input ``t + 1``. ``start_pos`` is the absolute position of the
window's first step (an int, or a per-batch int tensor), so that position encodings stay
consistent when a window slides along a series.

Cached decoding (``supports_cache = True``): ``init_cache`` allocates per-layer state, and
``step`` consumes one new step ``(B, 1, 1)`` at absolute position ``cache.pos`` and returns its
prediction ``(B, 1, 1)``; feeding a whole window step by step equals ``forward`` on it.

Direct multi-step forecasts (``supports_direct = True``): a model built with a direct horizon
``H > 0`` (:attr:`direct_horizon`) also predicts the ``H`` steps after a window in one call:
``forecast_direct(x, horizon, start_pos)`` returns ``(B, horizon, 1)`` for ``horizon <= H``, and
``forward(x, start_pos, direct=True)`` returns ``(one-step predictions (B, T, 1), direct (B, H, 1))``
from one pass (what training calls, so a distributed wrapper sees a plain forward).
"""
from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn


class ForecastModel(nn.Module):
    #: Registry names of the positional encodings this architecture accepts ("*" = any).
    accepted_pes: ClassVar[tuple[str, ...]] = ("*",)
    #: Whether ``init_cache``/``step`` give cached autoregressive decoding.
    supports_cache: ClassVar[bool] = False
    #: Whether the architecture can carry a direct multi-step head (``forecast_direct``).
    supports_direct: ClassVar[bool] = False
    #: Whether ``forward`` predicts every next step of the window (False: a direct-only model).
    one_step: ClassVar[bool] = True
    #: Hyper-parameter defaults (the CLI and ``create_model`` fill in from these).
    defaults: ClassVar[dict[str, Any]] = {}

    @classmethod
    def validate(cls, pe: str, **hparams) -> None:
        """Raise ``vqext.errors.ConfigError`` naming what to change if the combination is invalid."""

    def forward(self, x: torch.Tensor, start_pos: int | torch.Tensor = 0) -> torch.Tensor:
        raise NotImplementedError

    def init_cache(self, batch_size: int, max_len: int | None = None, start_pos: int = 0):
        raise NotImplementedError(f"{type(self).__name__} does not support cached decoding")

    def step(self, x_t: torch.Tensor, cache) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} does not support cached decoding")

    @property
    def direct_horizon(self) -> int:
        """Steps the direct head predicts in one call (0: this model has none)."""
        return 0

    def forecast_direct(self, x: torch.Tensor, horizon: int, start_pos: int | torch.Tensor = 0) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} has no direct multi-step head")


def next_value(model, x: torch.Tensor, start_pos: int | torch.Tensor = 0) -> torch.Tensor:
    """The prediction of the value after each window ``x`` ``(B, T, 1)``: ``(B, 1, 1)``.

    The last one-step output, or the first step of the direct forecast of a direct-only model.
    """
    if getattr(model, "one_step", True):
        return model(x, start_pos=start_pos)[:, -1:]
    return model.forecast_direct(x, 1, start_pos=start_pos)
