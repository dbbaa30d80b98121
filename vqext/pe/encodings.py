"""The built-in positional encodings: ``none``, ``randn``, ``sinpe``, ``rope``.

Every encoding (built-in or plugin) subclasses :class:`PositionalEncoding`:

* it is built as ``cls(dim, time_steps)``: ``dim`` is the width it encodes (a head size for the
  seed's per-head models, ``d_model`` for an input encoding) and ``time_steps`` the training window
  length, which table-based encodings use as their table size;
* ``forward(x, start_pos=0)`` takes ``x`` of shape ``(B, T, dim)`` or ``(B, H, T, dim)`` whose row
  ``t`` sits at absolute position ``start_pos + t`` (``start_pos`` an int or a ``(B,)`` int
  tensor) and returns the encoded tensor of the same shape;
* ``mode`` tells an architecture how the encoding acts: ``"add"`` (a vector added to the input),
  ``"rotate"`` (rotary: architectures with attention rotate queries and keys inside the kernel at
  base ``cls.base`` instead of calling ``forward``), or ``"identity"``.
"""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from ..errors import ConfigError, VqextError
from ..ops import apply_rope


def positions(start_pos: int | torch.Tensor, batch: int, length: int, device) -> torch.Tensor:
    """Absolute positions ``(batch, length)`` of a window starting at ``start_pos``."""
    steps = torch.arange(length, device=device, dtype=torch.int64)
    if isinstance(start_pos, torch.Tensor):
        offset = start_pos.to(device=device, dtype=torch.int64).reshape(-1)
        if offset.numel() == 1:
            offset = offset.expand(batch)
        elif offset.numel() != batch:
            raise ValueError(f"start_pos has {offset.numel()} entries but the batch has {batch} rows")
        return offset.unsqueeze(1) + steps.unsqueeze(0)
    return (steps + int(start_pos)).unsqueeze(0).expand(batch, length)


def _broadcast(table: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A per-(batch, position) table ``(B, T, dim)`` shaped to add onto ``x`` (3-D or 4-D)."""
    return table.unsqueeze(1) if x.dim() == 4 else table


class PositionalEncoding(nn.Module):
    """Base class of every positional encoding (see the module docstring for the contract)."""

    mode: ClassVar[str] = "add"
    #: Whether ``dim`` must be even (rotary and sin/cos pairs).
    needs_even_dim: ClassVar[bool] = False
    #: Whether any absolute position works (False: limited to a table of ``time_steps`` rows).
    any_position: ClassVar[bool] = True
    #: Whether attention sees only position differences (a cached decode equals recomputation).
    #: Defaults from ``mode``: "identity" and "rotate" are relative, "add" (a table) is absolute.
    relative: ClassVar[bool] = False
    #: Column title in reports (default: the registered name).
    title: ClassVar[str | None] = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "relative" not in cls.__dict__:
            cls.relative = cls.mode in ("identity", "rotate")

    def __init__(self, dim: int, time_steps: int):
        super().__init__()
        self.dim = int(dim)
        self.time_steps = int(time_steps)

    @classmethod
    def check(cls, dim: int, time_steps: int) -> str | None:
        """What is wrong with this width / window for this encoding (None: nothing)."""
        if cls.needs_even_dim and dim % 2:
            return f"an even width, got {dim}"
        return None

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() not in (3, 4) or x.shape[-1] != self.dim:
            raise ValueError(f"{type(self).__name__}: x must be (B, T, {self.dim}) or (B, H, T, {self.dim}), "
                             f"got shape {tuple(x.shape)}")

    def forward(self, x: torch.Tensor, start_pos: int | torch.Tensor = 0) -> torch.Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"dim={self.dim}, time_steps={self.time_steps}"


class NoPE(PositionalEncoding):
    """No positional information (the log's "original" models)."""

    mode = "identity"
    title = "Original"

    def forward(self, x, start_pos=0):
        return x


class RandnPE(PositionalEncoding):
    """The log's fixed table: ``0.01 * randn(time_steps, dim)`` added, never trained.

    Only positions ``0 .. time_steps - 1`` exist; a later position raises instead of wrapping.
    """

    any_position = False
    title = "+RandnPE"

    def __init__(self, dim: int, time_steps: int):
        super().__init__(dim, time_steps)
        self.register_buffer("table", 0.01 * torch.randn(time_steps, dim))

    def forward(self, x, start_pos=0):
        self._check_input(x)
        B, T = x.shape[0], x.shape[-2]
        pos = positions(start_pos, B, T, x.device)
        lowest, highest = int(pos.min()), int(pos.max())
        if lowest < 0 or highest >= self.time_steps:
            raise VqextError(
                f"the randn positional encoding has a table of {self.time_steps} positions (time_steps) but "
                f"position {highest if highest >= self.time_steps else lowest} was requested; keep start_pos + "
                f"window length <= {self.time_steps}, or use sinpe/rope, which work at any position")
        return x + _broadcast(self.table[pos].to(x.dtype), x)


class SinusoidalPE(PositionalEncoding):
    """sin/cos pairs added: dimension 2i is ``sin(pos / 10000^(2i/dim))``, 2i+1 its cosine.

    Computed for the positions asked (in float64, then cast), so any position works.
    """

    base: ClassVar[float] = 10000.0
    title = "+SinPE"

    def forward(self, x, start_pos=0):
        self._check_input(x)
        B, T = x.shape[0], x.shape[-2]
        pos = positions(start_pos, B, T, x.device).to(torch.float64)
        pairs = (self.dim + 1) // 2
        inv_freq = torch.pow(torch.tensor(self.base, dtype=torch.float64, device=x.device),
                             -2.0 * torch.arange(pairs, dtype=torch.float64, device=x.device) / self.dim)
        angle = pos.unsqueeze(-1) * inv_freq  # (B, T, pairs)
        table = torch.stack((angle.sin(), angle.cos()), dim=-1).reshape(B, T, 2 * pairs)[..., :self.dim]
        return x + _broadcast(table.to(x.dtype), x)


class RoPE(PositionalEncoding):
    """Rotary encoding: pairs (2i, 2i+1) turned by ``pos * base^(-2i/dim)`` (``vqext.ops.apply_rope``).

    The log's models rotate their per-head embedding with it; attention architectures rotate
    queries and keys inside ``rope_attention`` instead.
    """

    mode = "rotate"
    needs_even_dim = True
    base: ClassVar[float] = 10000.0
    title = "+RoPE"

    def forward(self, x, start_pos=0):
        self._check_input(x)
        if isinstance(start_pos, torch.Tensor):
            start_pos = start_pos.to(device=x.device, dtype=torch.int64).reshape(-1)
        return apply_rope(x, start_pos, self.base)


__all__ = ["PositionalEncoding", "NoPE", "RandnPE", "SinusoidalPE", "RoPE", "positions"]

