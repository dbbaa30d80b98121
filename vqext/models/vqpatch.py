"""VQPatch: patches of the window through a learned codebook, read out by a direct head (``vqpatch``).

The window is cut into patches of ``patch_len`` steps (a season is a natural length: 24 for hourly
data; the default is 24 for windows of at least 96 steps, else a quarter of the window); each patch
is one token. The model is a forecaster of the next ``direct_horizon`` values
only: it has no per-step outputs, so it forecasts further than its horizon by feeding its own
direct forecasts back (``roll`` in :mod:`vqext.forecasting`)::

    z      = (x - mean(x)) / std(x)                       # per window (instance_norm)
    tokens = Linear(patch_len -> d_model)(patches of z)   # left-padded with z's first value
    tokens = depth x VQFormerBlock(tokens)                # causal attention over patches, then
                                                          # codebook attention: each patch token is
                                                          # read through the learned codebook
    ahead  = Linear(P * d_model -> H)(LayerNorm(tokens))  # every token feeds the head
             + Linear(T -> H)(z)                          # linear_path
    y      = mean(x) + std(x) * ahead                     # anchor "mean"
             x[-1] + std(x) * ahead                       # anchor "last" (naive)
             x[T - season + h mod season] + std(x) * ahead  # anchor "season" (seasonal naive)

Why these parts (docs/results.md has the measurements): a forecast of many series at once needs
windows on one scale, so each window is standardised by its own statistics and the forecast is
mapped back with them; patch tokens let attention compare days rather than hours; the linear path
carries the part of the forecast that is a fixed weighting of the window (seasonal repetition),
so the tokens only learn what differs from it.

Positions: tokens sit at patch positions ``start_pos // patch_len + p``; ``rope`` rotates queries
and keys in every attention layer, an ``add`` encoding is added to the tokens.
"""
from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ._common import Quantize, check_attention_pe, check_common, check_input, init_hparams
from .base import ForecastModel
from .vqformer import VQFormerBlock

#: Variance floor of the window standardisation (squared units of the series' scaling): a flat
#: window is not blown up into noise.
INSTANCE_EPS = 1e-4
#: What the forecast is built on: the window's mean (the network's zero is the mean), or its last
#: value (zero-initialised heads: an untrained model is the naive forecast).
ANCHORS = ("mean", "last", "season")


def auto_patch_len(time_steps: int, patch_len: int | None) -> int:
    """``patch_len``, or when None a day of hourly data (24) where the window holds four, else a
    quarter of the window: short series still get several tokens."""
    return patch_len if patch_len is not None else min(24, max(1, time_steps // 4))


class _NoCodebook(nn.Module):
    def forward(self, h: torch.Tensor):
        return torch.zeros_like(h), h.new_zeros(())


class VQPatch(ForecastModel):
    accepted_pes = ("*",)
    supports_cache = False
    supports_direct = True
    one_step = False
    defaults = dict(time_steps=96, patch_len=None, vocab_size=64, d_model=64, heads=4, kv_heads=None, depth=2,
                    quantizer="soft", freeze_codebook=False, codebook_scale=None, commitment_weight=0.25,
                    codebook_projections=True, codebook=True, instance_norm=True, linear_path=True, anchor="last",
                    season=24, direct_horizon=24)
    arch_name = "vqpatch"
    recommended_pe: ClassVar[str] = "rope"
    recommended_training: ClassVar[dict] = dict(
        epochs=8, windows_per_epoch=40000, lr=1e-3, batch_size=256, lr_schedule="cosine", warmup=0.05,
        grad_clip=1.0, input_noise=0.0, last_weight=0.0, last_k=16, pushforward=0, loss="mae",
        keep_best=True)

    @classmethod
    def validate(cls, pe: str, **hparams) -> None:
        hp = {**cls.defaults, **hparams}
        check_common(cls.arch_name, hp)
        for name in ("codebook_projections", "codebook", "instance_norm", "linear_path"):
            if not isinstance(hp[name], bool):
                raise ConfigError(f"{cls.arch_name}: {name} must be true or false, got {hp[name]!r}")
        if hp["anchor"] not in ANCHORS:
            raise ConfigError(f"{cls.arch_name}: anchor must be one of {', '.join(ANCHORS)}, got {hp['anchor']!r}")
        season = hp["season"]
        if isinstance(season, bool) or not isinstance(season, int) or season < 1 or (
                hp["anchor"] == "season" and season > hp["time_steps"]):
            raise ConfigError(f"{cls.arch_name}: season (the period of anchor \"season\") must be an integer in "
                              f"1..time_steps ({hp['time_steps']}), got {season!r}")
        p = hp["patch_len"]
        if p is not None and (isinstance(p, bool) or not isinstance(p, int) or p < 1):
            raise ConfigError(f"{cls.arch_name}: patch_len must be None (automatic) or a positive integer, got {p!r}")
        p = auto_patch_len(hp["time_steps"], p)
        direct = hp["direct_horizon"]
        if isinstance(direct, bool) or not isinstance(direct, int) or direct < 1:
            raise ConfigError(f"{cls.arch_name} forecasts a horizon directly and has no one-step outputs: "
                              f"direct_horizon must be a positive integer, got {direct!r}")
        check_attention_pe(cls.arch_name, pe, hp, -(-hp["time_steps"] // p), "the patch tokens")

    def __init__(self, pe: str = "none", **hparams):
        super().__init__()
        from ..registry import get_pe

        hp = init_hparams(type(self), pe, hparams)
        self.hparams = hp
        self.pe_name = pe
        T, d, heads, H = hp["time_steps"], hp["d_model"], hp["heads"], hp["direct_horizon"]
        p = auto_patch_len(T, hp["patch_len"])
        self.patch_len = p
        self.patches = -(-T // p)
        pe_cls = get_pe(pe)
        self.embed = nn.Linear(p, d)
        self.token_pe = pe_cls(d, self.patches) if pe_cls.mode == "add" else None
        scale = hp["codebook_scale"] if hp["codebook_scale"] is not None else (d // heads) ** -0.5
        self.blocks = nn.ModuleList(
            VQFormerBlock(d, heads, hp["kv_heads"], pe_cls.mode == "rotate", float(getattr(pe_cls, "base", 10000.0)),
                          Quantize(hp["quantizer"], hp["vocab_size"], d, heads, scale,
                                   hp["freeze_codebook"], hp["commitment_weight"]),
                          projections=hp["codebook_projections"])
            for _ in range(hp["depth"]))
        if not hp["codebook"]:  # the ablation: attention alone, the codebook sub-layer removed
            for block in self.blocks:
                block.quantize = _NoCodebook()
        self.norm_out = nn.LayerNorm(d)
        self.head = nn.Linear(self.patches * d, H)
        self.linear_path = nn.Linear(T, H) if hp["linear_path"] else None
        self.instance_norm = hp["instance_norm"]
        self.anchor = hp["anchor"]
        # anchor "season": step h of the forecast starts from the window's value one season before it
        season = min(hp["season"], T)  # only anchor "season" reads it, and there validate() keeps it <= T
        lags = T - season + torch.arange(H) % season
        self.register_buffer("season_index", lags, persistent=False)
        if self.anchor != "mean":  # training starts from the (seasonal) naive forecast
            for layer in (self.head, self.linear_path):
                if layer is not None:
                    nn.init.zeros_(layer.weight)
                    nn.init.zeros_(layer.bias)
        self.aux_loss = torch.zeros(())

    @property
    def direct_horizon(self) -> int:
        return self.head.out_features

    def _standardise(self, v: torch.Tensor):
        if not self.instance_norm:
            return v, v.new_zeros(v.shape[0], 1), v.new_ones(v.shape[0], 1)
        loc = v.mean(1, keepdim=True)
        scale = (v.var(1, keepdim=True, unbiased=False) + INSTANCE_EPS).sqrt()
        return (v - loc) / scale, loc, scale

    def _tokens(self, z: torch.Tensor) -> torch.Tensor:
        pad = self.patches * self.patch_len - z.shape[1]
        if pad:  # a window that is not whole patches starts with copies of its first value
            z = F.pad(z.unsqueeze(1), (pad, 0), mode="replicate").squeeze(1)
        return self.embed(z.view(z.shape[0], self.patches, self.patch_len))

    def _token_start(self, start_pos):
        return start_pos // self.patch_len

    def forward(self, x: torch.Tensor, start_pos: int | torch.Tensor = 0, direct: bool = False):
        """``(None, forecast (B, direct_horizon, 1))``: the pair a direct head gives, without per-step outputs."""
        check_input(self, x)
        if x.shape[1] != self.hparams["time_steps"]:
            raise ValueError(f"VQPatch: x must have time_steps = {self.hparams['time_steps']} steps, got {x.shape[1]}")
        if not direct:
            raise ValueError("VQPatch has no one-step outputs; call forward(x, direct=True) or forecast_direct")
        z, loc, scale = self._standardise(x[..., 0])
        h = self._tokens(z)
        pos = self._token_start(start_pos)
        if self.token_pe is not None:
            h = self.token_pe(h, pos)
        # The block loop is VQFormer._run's; each model wraps it in its own input and output stages.
        aux = h.new_zeros(())
        for layer, block in enumerate(self.blocks):
            h, block_aux = block(h, pos, None, layer)
            aux = aux + block_aux
        self.aux_loss = aux
        ahead = self.head(self.norm_out(h).flatten(1))
        if self.linear_path is not None:
            ahead = ahead + self.linear_path(z)
        if self.anchor == "last":
            # = loc + scale * (z[:, -1:] + ahead), written so that ahead = 0 gives the last value exactly
            return None, (x[:, -1:, 0] + scale * ahead).unsqueeze(-1)
        if self.anchor == "season":
            return None, (x[:, self.season_index, 0] + scale * ahead).unsqueeze(-1)
        return None, (loc + scale * ahead).unsqueeze(-1)

    def forecast_direct(self, x: torch.Tensor, horizon: int, start_pos: int | torch.Tensor = 0) -> torch.Tensor:
        if not 1 <= horizon <= self.direct_horizon:
            raise ValueError(f"horizon must be within 1..{self.direct_horizon} (the direct head's), got {horizon}")
        return self.forward(x, start_pos, direct=True)[1][:, :horizon]
