"""``lstm``: the research log's strongest baseline, an LSTM (hidden 64, 2 layers) then a Linear."""
from __future__ import annotations

import torch
from torch import nn

from vqext.errors import ConfigError
from vqext.models.base import ForecastModel


class LSTMForecaster(ForecastModel):
    # An LSTM orders its inputs itself; it takes an encoding added to its input, or none.
    accepted_pes = ("none", "sinpe", "learned")
    supports_cache = False
    defaults = dict(hidden_size=64, num_layers=2, time_steps=96)

    @classmethod
    def validate(cls, pe: str, **hparams) -> None:
        for name in ("hidden_size", "num_layers", "time_steps"):
            value = hparams.get(name, cls.defaults[name])
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"lstm: {name} must be a positive integer, got {value!r}")

    def __init__(self, pe: str = "none", hidden_size: int = 64, num_layers: int = 2, time_steps: int = 96):
        super().__init__()
        from vqext.registry import get_pe

        self.pe_name = pe
        # The encoding is applied to the one-channel input, so the LSTM sees (value + encoding).
        self.pe = get_pe(pe)(1, time_steps)
        self.lstm = nn.LSTM(1, hidden_size, num_layers=num_layers, batch_first=True)
        self.head = nn.Linear(hidden_size, 1)

    def forward(self, x: torch.Tensor, start_pos: int | torch.Tensor = 0) -> torch.Tensor:
        if x.dim() != 3 or x.shape[-1] != 1:
            raise ValueError(f"LSTMForecaster: x must be (B, T, 1), got shape {tuple(x.shape)}")
        out, _ = self.lstm(self.pe(x, start_pos))
        return self.head(out)
