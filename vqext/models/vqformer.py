"""VQFormer: the seed's codebook model with causal attention and depth (``vqformer``).

``Linear(1 -> d_model) [+ absolute PE] -> depth x block -> LayerNorm -> Linear(d_model -> 1)``,
each block pre-norm with residuals::

    h = h + CausalSelfAttention(LayerNorm(h))     # RoPE on q, k inside the kernel when pe = rope
    h = h + CodebookAttention(LayerNorm(h))        # one codebook per head (or the hard quantiser)

An encoding of mode ``"add"`` (randn, sinpe, plugins) is added at the input; ``"rotate"`` (rope)
rotates queries and keys in every attention layer at their absolute positions, so cached decoding
and sliding windows keep exact positions. Decodes step by step through a :class:`KVCache`.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError
from ..nn.attention import CausalSelfAttention
from ..nn.kv_cache import KVCache
from ._common import Quantize, check_common, check_input, check_pe_width, head_size
from .base import ForecastModel


class VQFormerBlock(nn.Module):
    def __init__(self, d_model: int, heads: int, kv_heads: int | None, rope: bool, rope_base: float,
                 quantize: Quantize):
        super().__init__()
        self.heads = heads
        self.norm_attn = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, heads, kv_heads=kv_heads, rope=rope, rope_base=rope_base)
        self.norm_code = nn.LayerNorm(d_model)
        self.quantize = quantize

    def forward(self, h: torch.Tensor, start_pos, cache: KVCache | None, layer: int):
        h = h + self.attn(self.norm_attn(h), start_pos, cache, layer)
        B, T, D = h.shape
        split = self.norm_code(h).view(B, T, self.heads, D // self.heads).transpose(1, 2)
        quantized, aux = self.quantize(split)
        return h + quantized.transpose(1, 2).reshape(B, T, D), aux


class VQFormer(ForecastModel):
    accepted_pes = ("*",)
    supports_cache = True
    defaults = dict(vocab_size=256, d_model=64, heads=4, kv_heads=None, depth=2, time_steps=96,
                    quantizer="soft", freeze_codebook=False, codebook_scale=None, commitment_weight=0.25)
    arch_name = "vqformer"

    @classmethod
    def validate(cls, pe: str, **hparams) -> None:
        from ..registry import get_pe

        hp = {**cls.defaults, **hparams}
        check_common(cls.arch_name, hp)
        hd = head_size(cls.arch_name, hp["d_model"], hp["heads"])
        pe_cls = get_pe(pe)
        if pe_cls.mode == "rotate":
            check_pe_width(cls.arch_name, pe, pe_cls, hd, hp["time_steps"],
                           f"d_model {hp['d_model']} / heads {hp['heads']} gives head size {hd}")
        elif pe_cls.mode == "add":
            check_pe_width(cls.arch_name, pe, pe_cls, hp["d_model"], hp["time_steps"],
                           f"it is added to the input of width d_model {hp['d_model']}")
        elif pe_cls.mode != "identity":
            raise ConfigError(f"{cls.arch_name}: encoding {pe!r} has mode {pe_cls.mode!r}; vqformer accepts "
                              f"encodings of mode 'add', 'rotate' or 'identity'")

    def __init__(self, pe: str = "none", **hparams):
        super().__init__()
        from ..registry import get_pe

        unknown = set(hparams) - set(self.defaults)
        if unknown:
            raise TypeError(f"VQFormer got unknown hyper-parameters {sorted(unknown)}")
        hp = {**self.defaults, **hparams}
        self.validate(pe, **hp)
        self.hparams = hp
        self.pe_name = pe
        d, heads = hp["d_model"], hp["heads"]
        pe_cls = get_pe(pe)
        rotate = pe_cls.mode == "rotate"
        self.encoder = nn.Linear(1, d)
        self.input_pe = pe_cls(d, hp["time_steps"]) if pe_cls.mode == "add" else None
        self.blocks = nn.ModuleList(
            VQFormerBlock(d, heads, hp["kv_heads"], rotate, float(getattr(pe_cls, "base", 10000.0)),
                          Quantize(hp["quantizer"], hp["vocab_size"], d, heads, hp["codebook_scale"],
                                   hp["freeze_codebook"], hp["commitment_weight"]))
            for _ in range(hp["depth"]))
        self.norm_out = nn.LayerNorm(d)
        self.decoder = nn.Linear(d, 1)
        self.aux_loss = torch.zeros(())

    def _run(self, x: torch.Tensor, start_pos, cache: KVCache | None) -> torch.Tensor:
        h = self.encoder(x)
        if self.input_pe is not None:
            h = self.input_pe(h, start_pos)
        aux = h.new_zeros(())
        for layer, block in enumerate(self.blocks):
            h, block_aux = block(h, start_pos, cache, layer)
            aux = aux + block_aux
        self.aux_loss = aux
        return self.decoder(self.norm_out(h))

    def forward(self, x: torch.Tensor, start_pos: int | torch.Tensor = 0) -> torch.Tensor:
        check_input(self, x)
        return self._run(x, start_pos, None)

    def init_cache(self, batch_size: int, max_len: int | None = None, start_pos: int = 0) -> KVCache:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        return KVCache(len(self.blocks), max_len, start_pos)

    def step(self, x_t: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Predictions for new steps ``x_t`` ``(B, n, 1)`` (usually n = 1) at ``cache.pos``."""
        check_input(self, x_t, "x_t")
        if cache.num_layers != len(self.blocks):
            raise ValueError(f"the cache has {cache.num_layers} layers but the model has {len(self.blocks)}; "
                             "make it with model.init_cache")
        y = self._run(x_t, cache.pos, cache)
        cache.advance(x_t.shape[1])
        return y
