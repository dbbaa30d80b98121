"""VQLNMLP and MHVQLNMLP, the architectures of the 2024-12-23 research log
(``../shared/seed/20241223.md``, "the log" below), as one model with a head count.

``Linear(1 -> d_model) -> split into heads -> PE (per head) -> LayerNorm (per head, shared) ->
codebook attention (one codebook per head) -> merge heads -> Linear(d_model -> 1)``.

Faithful to the log: the codebook starts as ``randn(heads, K, d_model / heads)`` and, by default,
is frozen (the log's code registered it as a buffer, so it never trained), the score scale is
``1 / sqrt(d_model)`` for every head count, and one LayerNorm of the head size is shared by the
heads. There is no mixing between time steps: output ``t`` depends only on input ``t`` and its
position, so cached decoding is trivial (``step`` is ``forward`` on one step at ``cache.pos``).
"""
from __future__ import annotations

import torch
from torch import nn

from ..nn.kv_cache import KVCache
from ._common import Quantize, check_common, check_input, check_pe_width, head_size
from .base import ForecastModel


class MHVQLNMLP(ForecastModel):
    """Multi-head codebook model of the log (``mhvqlnmlp``); ``VQLNMLP`` is its one-head case."""

    accepted_pes = ("*",)
    supports_cache = True
    defaults = dict(vocab_size=512, d_model=64, heads=2, time_steps=96, quantizer="soft",
                    freeze_codebook=True, codebook_scale=None, commitment_weight=0.25)
    arch_name = "mhvqlnmlp"

    @classmethod
    def validate(cls, pe: str, **hparams) -> None:
        from ..registry import get_pe

        hp = {**cls.defaults, **hparams}
        check_common(cls.arch_name, hp)
        heads = hp.get("heads", 1)
        hd = head_size(cls.arch_name, hp["d_model"], heads)
        where = (f"d_model {hp['d_model']} / heads {heads} gives head size {hd}" if heads > 1
                 else f"it encodes d_model {hp['d_model']}")
        check_pe_width(cls.arch_name, pe, get_pe(pe), hd, hp["time_steps"], where)

    def __init__(self, pe: str = "none", **hparams):
        super().__init__()
        from ..registry import get_pe

        unknown = set(hparams) - set(self.defaults) - {"heads"}
        if unknown:
            raise TypeError(f"{type(self).__name__} got unknown hyper-parameters {sorted(unknown)}")
        hp = {**self.defaults, **hparams}
        self.validate(pe, **hp)
        self.hparams = {k: hp[k] for k in self.defaults}
        self.pe_name = pe
        self.heads = hp.get("heads", 1)
        self.d_model = hp["d_model"]
        self.head_dim = self.d_model // self.heads
        self.encoder = nn.Linear(1, self.d_model)
        self.pe = get_pe(pe)(self.head_dim, hp["time_steps"])
        self.ln = nn.LayerNorm(self.head_dim)
        self.quantize = Quantize(hp["quantizer"], hp["vocab_size"], self.d_model, self.heads,
                                 hp["codebook_scale"], hp["freeze_codebook"], hp["commitment_weight"])
        self.decoder = nn.Linear(self.d_model, 1)
        self.aux_loss = torch.zeros(())

    def _heads(self, x: torch.Tensor, start_pos) -> torch.Tensor:
        B, T, _ = x.shape
        h = self.encoder(x).view(B, T, self.heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        return self.ln(self.pe(h, start_pos))

    def forward(self, x: torch.Tensor, start_pos: int | torch.Tensor = 0) -> torch.Tensor:
        check_input(self, x)
        B, T, _ = x.shape
        quantized, self.aux_loss = self.quantize(self._heads(x, start_pos))
        return self.decoder(quantized.transpose(1, 2).reshape(B, T, self.d_model))

    @torch.no_grad()
    def code_indices(self, x: torch.Tensor, start_pos: int | torch.Tensor = 0) -> torch.Tensor:
        """The code used at each position and head, ``(B, T, heads)``, for usage statistics."""
        check_input(self, x)
        return self.quantize.codebook_usage_indices(self._heads(x, start_pos))

    def init_cache(self, batch_size: int, max_len: int | None = None, start_pos: int = 0) -> KVCache:
        # No attention between steps, so the cache only carries the position.
        return KVCache(0, max_len, start_pos)

    def step(self, x_t: torch.Tensor, cache: KVCache) -> torch.Tensor:
        check_input(self, x_t, "x_t")
        y = self.forward(x_t, cache.pos)
        cache.advance(x_t.shape[1])
        return y


class VQLNMLP(MHVQLNMLP):
    """The log's one-head model (``vqlnmlp``): LayerNorm over d_model, one codebook of K codes."""

    defaults = dict(vocab_size=512, d_model=64, time_steps=96, quantizer="soft",
                    freeze_codebook=True, codebook_scale=None, commitment_weight=0.25)
    arch_name = "vqlnmlp"

    def __init__(self, pe: str = "none", **hparams):
        if "heads" in hparams:
            raise TypeError("VQLNMLP is single-head; use MHVQLNMLP (mhvqlnmlp) for several heads")
        super().__init__(pe, heads=1, **hparams)
