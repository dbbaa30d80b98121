"""VQFormer: the log's codebook model with causal attention and depth (``vqformer``).

``Linear(1 -> d_model) [+ absolute PE] -> depth x block -> LayerNorm -> Linear(d_model -> 1)``,
each block pre-norm with residuals::

    h = h + CausalSelfAttention(LayerNorm(h))     # RoPE on q, k inside the kernel when pe = rope
    h = h + Wo CodebookAttention(Wq LayerNorm(h))  # one codebook per head (or the hard quantiser)

Output options (the defaults are the configuration recommended in docs/results.md):

* ``residual``: the network predicts the increment ``x[t+1] - x[t]`` and the model returns
  ``x[t] + network``. A series that mostly moves a little per step is then easy to track.
* ``ar_skip``: a linear autoregressive path, a causal ``Conv1d(1, 1, ar_skip)`` over the input added
  to the output, zero-initialised (so training starts from the network alone). History before the
  window's first step repeats that first value. ``None`` = the window length ``time_steps``; 0 = off.
* ``codebook_projections``: learned ``Wq``/``Wo`` around the codebook attention (the codebook then
  lives in its own coordinates instead of the residual stream's).
* ``direct_horizon``: ``H > 0`` adds a direct multi-step head, a linear map from the last step's
  (normalised) hidden state to the ``H`` following values (increments over the last input when
  ``residual``), trained alongside the one-step outputs (:meth:`forecast_direct`). 0 = none.
* ``codebook_scale``: the score scale of the codebook attention; ``None`` = ``1 / sqrt(head size)``.

``recommended_training`` holds the training settings measured with these defaults; ``vqext run``
uses them for any setting the user does not give.

An encoding of mode ``"add"`` (randn, sinpe, plugins) is added at the input; ``"rotate"`` (rope)
rotates queries and keys in every attention layer at their absolute positions, so cached decoding
and sliding windows keep exact positions. Decodes step by step through a :class:`KVCache`.
"""
from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..nn.attention import CausalSelfAttention
from ..nn.kv_cache import KVCache, SlidingBuffer
from ._common import Quantize, check_attention_pe, check_common, check_input, init_hparams
from .base import ForecastModel
from .vqformer_decode import NativeStep, native_step


class VQFormerBlock(nn.Module):
    def __init__(self, d_model: int, heads: int, kv_heads: int | None, rope: bool, rope_base: float,
                 quantize: Quantize, projections: bool = False):
        super().__init__()
        self.heads = heads
        self.norm_attn = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, heads, kv_heads=kv_heads, rope=rope, rope_base=rope_base)
        self.norm_code = nn.LayerNorm(d_model)
        self.code_in = nn.Linear(d_model, d_model) if projections else nn.Identity()
        self.quantize = quantize
        self.code_out = nn.Linear(d_model, d_model) if projections else nn.Identity()

    def code_queries(self, h: torch.Tensor) -> torch.Tensor:
        """What the quantiser sees: ``(B, heads, T, head size)``."""
        B, T, D = h.shape
        return self.code_in(self.norm_code(h)).view(B, T, self.heads, D // self.heads).transpose(1, 2)

    def forward(self, h: torch.Tensor, start_pos, cache: KVCache | None, layer: int):
        h = h + self.attn(self.norm_attn(h), start_pos, cache, layer)
        B, T, D = h.shape
        quantized, aux = self.quantize(self.code_queries(h))
        return h + self.code_out(quantized.transpose(1, 2).reshape(B, T, D)), aux


class VQFormerCache(KVCache):
    """The attention layers' keys and values plus the last inputs the AR skip path reads.

    The input history is bounded like the keys (``max_len``), so a sliding-window decode sees the
    same inputs as recomputing that window.
    """

    def __init__(self, num_layers: int, max_len: int | None = None, start_pos: int | torch.Tensor = 0,
                 input_len: int = 0):
        super().__init__(num_layers, max_len, start_pos)
        self.input_len = input_len
        self._input_keep = max(1, input_len if max_len is None else min(input_len, max_len))
        self._inputs = SlidingBuffer(self._input_keep, dim=1)

    @property
    def inputs(self) -> torch.Tensor | None:
        """The held inputs ``(B, m, 1)``, newest last (None before the first step)."""
        return self._inputs.held()

    def append_inputs(self, x_t: torch.Tensor) -> torch.Tensor:
        """Add ``x_t`` ``(B, n, 1)``; returns the held history ending with it (``(B, m, 1)``)."""
        return self._inputs.append(x_t, self._input_keep + x_t.shape[1] - 1)

    def allocated(self) -> bool:
        return super().allocated() and (self.input_len == 0 or self._inputs.storage is not None)

    def reserve_input(self) -> tuple[torch.Tensor, list[int]]:
        """Room for one input written by a kernel: ``(storage (B, capacity, 1), [write_at, first, visible])``."""
        return self._inputs.storage, list(self._inputs.reserve(1, self._input_keep))

    def reset(self, start_pos: int | torch.Tensor = 0) -> None:
        self.__init__(self.num_layers, self.max_len, start_pos, self.input_len)


class VQFormer(ForecastModel):
    accepted_pes = ("*",)
    supports_cache = True
    supports_direct = True
    defaults = dict(vocab_size=64, d_model=64, heads=4, kv_heads=None, depth=2, time_steps=96,
                    quantizer="soft", freeze_codebook=False, codebook_scale=None, commitment_weight=0.25,
                    codebook_projections=True, residual=True, ar_skip=None, direct_horizon=0)
    arch_name = "vqformer"
    #: ``vqext run`` without ``--arch`` trains this architecture with this encoding.
    recommended_pe: ClassVar[str] = "rope"
    #: Training settings measured with the defaults above (docs/results.md); used where not given.
    recommended_training: ClassVar[dict] = dict(
        epochs=40, lr=3e-3, batch_size=32, lr_schedule="cosine", warmup=0.05, grad_clip=1.0,
        input_noise=0.1, last_weight=1.0, last_k=16, pushforward=2)

    @classmethod
    def validate(cls, pe: str, **hparams) -> None:
        hp = {**cls.defaults, **hparams}
        check_common(cls.arch_name, hp)
        for name in ("codebook_projections", "residual"):
            if not isinstance(hp[name], bool):
                raise ConfigError(f"{cls.arch_name}: {name} must be true or false, got {hp[name]!r}")
        skip = hp["ar_skip"]
        if skip is not None and (isinstance(skip, bool) or not isinstance(skip, int) or skip < 0):
            raise ConfigError(f"{cls.arch_name}: ar_skip must be None (= time_steps), 0 (off) or a positive "
                              f"integer (the AR filter's length), got {skip!r}")
        direct = hp["direct_horizon"]
        if isinstance(direct, bool) or not isinstance(direct, int) or direct < 0:
            raise ConfigError(f"{cls.arch_name}: direct_horizon must be 0 (no direct head) or a positive integer, "
                              f"got {direct!r}")
        check_attention_pe(cls.arch_name, pe, hp, hp["time_steps"], "the input")

    def __init__(self, pe: str = "none", **hparams):
        super().__init__()
        from ..registry import get_pe

        hp = init_hparams(type(self), pe, hparams)
        self.hparams = hp
        self.pe_name = pe
        d, heads = hp["d_model"], hp["heads"]
        pe_cls = get_pe(pe)
        rotate = pe_cls.mode == "rotate"
        self.encoder = nn.Linear(1, d)
        self.input_pe = pe_cls(d, hp["time_steps"]) if pe_cls.mode == "add" else None
        scale = hp["codebook_scale"] if hp["codebook_scale"] is not None else (d // heads) ** -0.5
        self.blocks = nn.ModuleList(
            VQFormerBlock(d, heads, hp["kv_heads"], rotate, float(getattr(pe_cls, "base", 10000.0)),
                          Quantize(hp["quantizer"], hp["vocab_size"], d, heads, scale,
                                   hp["freeze_codebook"], hp["commitment_weight"]),
                          projections=hp["codebook_projections"])
            for _ in range(hp["depth"]))
        self.norm_out = nn.LayerNorm(d)
        self.decoder = nn.Linear(d, 1)
        self.residual = hp["residual"]
        skip = hp["time_steps"] if hp["ar_skip"] is None else hp["ar_skip"]
        self.ar_skip = nn.Conv1d(1, 1, skip) if skip else None
        if self.ar_skip is not None:  # start from the network alone; the filter learns what it adds
            nn.init.zeros_(self.ar_skip.weight)
            nn.init.zeros_(self.ar_skip.bias)
        # Built last, so a model without it initialises every other parameter as before.
        self.direct_head = nn.Linear(d, hp["direct_horizon"]) if hp["direct_horizon"] else None
        self.aux_loss = torch.zeros(())

    @property
    def direct_horizon(self) -> int:
        return self.direct_head.out_features if self.direct_head is not None else 0

    def _ar(self, history: torch.Tensor, n: int) -> torch.Tensor:
        """The AR path's outputs for the last ``n`` steps of ``history`` ``(B, m, 1)``."""
        L = self.ar_skip.kernel_size[0]
        seq = history[:, -(n + L - 1):, 0].unsqueeze(1)  # (B, 1, <= n + L - 1)
        seq = F.pad(seq, (n + L - 1 - seq.shape[-1], 0), mode="replicate")
        return self.ar_skip(seq).transpose(1, 2)  # (B, n, 1)

    def _run(self, x: torch.Tensor, start_pos, cache: KVCache | None, history: torch.Tensor | None = None,
             direct: bool = False):
        h = self.encoder(x)
        if self.input_pe is not None:
            h = self.input_pe(h, start_pos)
        # The block loop is also VQPatch.forward's; each model wraps it in its own input and output stages.
        aux = h.new_zeros(())
        for layer, block in enumerate(self.blocks):
            h, block_aux = block(h, start_pos, cache, layer)
            aux = aux + block_aux
        self.aux_loss = aux
        h = self.norm_out(h)
        y = self.decoder(h)
        if self.ar_skip is not None:
            y = y + self._ar(x if history is None else history, x.shape[1])
        y = x + y if self.residual else y
        if not direct:
            return y
        ahead = self.direct_head(h[:, -1]).unsqueeze(-1)  # (B, H, 1)
        return y, (x[:, -1:] + ahead if self.residual else ahead)

    def forward(self, x: torch.Tensor, start_pos: int | torch.Tensor = 0, direct: bool = False):
        check_input(self, x)
        if direct and self.direct_head is None:
            raise ValueError("this VQFormer has no direct head; build it with direct_horizon > 0")
        return self._run(x, start_pos, None, direct=direct)

    def forecast_direct(self, x: torch.Tensor, horizon: int, start_pos: int | torch.Tensor = 0) -> torch.Tensor:
        """The ``horizon`` (``<= direct_horizon``) values after window ``x`` ``(B, T, 1)``: ``(B, horizon, 1)``."""
        if not 1 <= horizon <= self.direct_horizon:
            raise ValueError(f"horizon must be within 1..{self.direct_horizon} (the direct head's), got {horizon}")
        return self.forward(x, start_pos, direct=True)[1][:, :horizon]

    @torch.no_grad()
    def code_indices(self, x: torch.Tensor, start_pos: int | torch.Tensor = 0) -> torch.Tensor:
        """The code each step uses in the first block, ``(B, T, heads)``."""
        check_input(self, x)
        h = self.encoder(x)
        if self.input_pe is not None:
            h = self.input_pe(h, start_pos)
        block = self.blocks[0]
        h = h + block.attn(block.norm_attn(h), start_pos, None, 0)
        return block.quantize.codebook_usage_indices(block.code_queries(h))

    def init_cache(self, batch_size: int, max_len: int | None = None, start_pos: int = 0) -> KVCache:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        inputs = self.ar_skip.kernel_size[0] if self.ar_skip is not None else 0
        self.__dict__.pop("_native", None)  # gathered again: parameters may have been replaced since
        return VQFormerCache(len(self.blocks), max_len, start_pos, input_len=inputs)

    def step(self, x_t: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Predictions for new steps ``x_t`` ``(B, n, 1)`` (usually n = 1) at ``cache.pos``.

        Without autograd (``torch.no_grad``/``inference_mode``), a single step that the native op
        covers (:mod:`vqext.models.vqformer_decode`) is one call of it; it skips module hooks. Every
        other step runs the modules, as does every step with ``fast_decode = False``.
        """
        check_input(self, x_t, "x_t")
        if cache.num_layers != len(self.blocks):
            raise ValueError(f"the cache has {cache.num_layers} layers but the model has {len(self.blocks)}; "
                             "make it with model.init_cache")
        if self.ar_skip is not None and not isinstance(cache, VQFormerCache):
            raise ValueError("this model's AR skip path needs the inputs held by a VQFormerCache; make the cache "
                             "with model.init_cache")
        native = self._native_step() if self.fast_decode and x_t.shape[1] == 1 and not torch.is_grad_enabled() else None
        y = native(x_t, cache) if native is not None else None
        if y is None:
            history = cache.append_inputs(x_t) if self.ar_skip is not None else None
            y = self._run(x_t, cache.pos, cache, history)
        cache.advance(x_t.shape[1])
        return y

    #: Whether :meth:`step` may take the native op for a single step without autograd.
    fast_decode: bool = True

    def _native_step(self) -> NativeStep | None:
        """The native step's fixed arguments, gathered once per cache (module attribute look-ups
        cost more than the step's arithmetic); None where the op does not cover this model."""
        if "_native" not in self.__dict__:
            self._native = native_step(self)
        return self._native
