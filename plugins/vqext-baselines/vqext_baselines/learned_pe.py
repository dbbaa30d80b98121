"""``learned``: a trained table of positions (``time_steps`` rows), added to the input."""
from __future__ import annotations

import torch
from torch import nn

from vqext.errors import VqextError
from vqext.pe.encodings import PositionalEncoding, positions


class LearnedPE(PositionalEncoding):
    mode = "add"
    any_position = False

    def __init__(self, dim: int, time_steps: int):
        super().__init__(dim, time_steps)
        self.table = nn.Parameter(0.02 * torch.randn(time_steps, dim))

    def forward(self, x: torch.Tensor, start_pos=0) -> torch.Tensor:
        self._check_input(x)
        pos = positions(start_pos, x.shape[0], x.shape[-2], x.device)
        if int(pos.min()) < 0 or int(pos.max()) >= self.time_steps:
            raise VqextError(f"the learned positional encoding has {self.time_steps} positions (time_steps); "
                             f"positions {int(pos.min())}..{int(pos.max())} were requested")
        table = self.table[pos]
        return x + (table.unsqueeze(1) if x.dim() == 4 else table)
