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
from .. import _native
from ..nn.kv_cache import KVCache, SlidingBuffer
from ._common import Quantize, check_common, check_input, check_pe_width, head_size
from .base import ForecastModel


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
        from ..registry import get_pe

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
        self._plan = None  # re-gathered on the first fast step, in case parameters were replaced
        return VQFormerCache(len(self.blocks), max_len, start_pos, input_len=inputs)

    def step(self, x_t: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Predictions for new steps ``x_t`` ``(B, n, 1)`` (usually n = 1) at ``cache.pos``.

        Without autograd (``torch.no_grad``/``inference_mode``), a single step on the native
        kernels takes :meth:`_decode_one`, the same computation with the Python overhead of the
        module calls cut; it skips module hooks. Set ``fast_decode = False`` to always run the modules.
        """
        check_input(self, x_t, "x_t")
        if cache.num_layers != len(self.blocks):
            raise ValueError(f"the cache has {cache.num_layers} layers but the model has {len(self.blocks)}; "
                             "make it with model.init_cache")
        if self.ar_skip is not None and not isinstance(cache, VQFormerCache):
            raise ValueError("this model's AR skip path needs the inputs held by a VQFormerCache; make the cache "
                             "with model.init_cache")
        if (self.fast_decode and x_t.shape[1] == 1 and not torch.is_grad_enabled()
                and x_t.dtype in (torch.float32, torch.float64) and _native.use_native(x_t)):
            y = self._decode_one(x_t, cache)
        else:
            history = cache.append_inputs(x_t) if self.ar_skip is not None else None
            y = self._run(x_t, cache.pos, cache, history)
        cache.advance(x_t.shape[1])
        return y

    #: Whether :meth:`step` may take the inference fast path (:meth:`_decode_one`).
    fast_decode: bool = True

    def _decode_plan(self) -> tuple[list[tuple], tuple, tuple | None]:
        """Per block, the tensors and sizes :meth:`_decode_one` reads, gathered once per cache: module
        attribute look-ups cost more than the step's arithmetic. It holds the parameters themselves
        (not copies), so in-place updates (optimisers, ``load_state_dict``) stay visible. Returns the
        blocks' plans, the output head's, and the native op's arguments
        (:meth:`_native_decode_args`)."""
        def norm(ln: nn.LayerNorm):
            return ln.normalized_shape, ln.weight, ln.bias, ln.eps

        def linear(proj: nn.Module):
            return (proj.weight, proj.bias) if isinstance(proj, nn.Linear) else None

        plan = []
        for block in self.blocks:
            attn, quantize = block.attn, block.quantize
            soft = quantize.kind == "soft"
            plan.append((
                norm(block.norm_attn), (attn.qkv_proj.weight, attn.qkv_proj.bias),
                (attn.heads, attn.kv_heads, attn.head_dim, attn.rope, attn.rope_base, attn.head_dim ** -0.5),
                (attn.out_proj.weight, attn.out_proj.bias), norm(block.norm_code),
                linear(block.code_in), linear(block.code_out),
                (quantize.codes.codebook, quantize.codes.scale) if soft else None, block))
        ar = None
        if self.ar_skip is not None:
            L = self.ar_skip.kernel_size[0]
            ar = (L, self.ar_skip.weight.view(1, L), self.ar_skip.bias)
        head = ((self.encoder.weight, self.encoder.bias), norm(self.norm_out), (self.decoder.weight, self.decoder.bias),
                ar)
        return plan, head, self._native_decode_args()

    def _native_decode_args(self) -> tuple | None:
        """``(params, sizes, scalars)`` for ``torch.ops.vqext.vqformer_decode_step``, or None where the
        native step does not cover the model (hard quantiser, an added encoding, mixed dtypes,
        custom layer-norm settings); those decode on :meth:`_decode_one`'s op-by-op path."""
        if not _native.native_available() or not hasattr(torch.ops.vqext, "vqformer_decode_step"):
            return None
        if self.input_pe is not None or any(b.quantize.kind != "soft" for b in self.blocks):
            return None
        norms = [self.norm_out] + [n for b in self.blocks for n in (b.norm_attn, b.norm_code)]
        if any(n.weight is None or n.bias is None or n.eps != norms[0].eps for n in norms):
            return None
        first = self.blocks[0]
        shape = (first.attn.heads, first.attn.kv_heads, first.attn.head_dim, first.attn.rope, first.attn.rope_base,
                 first.quantize.codes.scale)
        params: list[torch.Tensor | None] = []
        for b in self.blocks:
            a, codes = b.attn, b.quantize.codes
            if (a.heads, a.kv_heads, a.head_dim, a.rope, a.rope_base, codes.scale) != shape or codes.heads != a.heads:
                return None
            code_in = b.code_in if isinstance(b.code_in, nn.Linear) else None
            code_out = b.code_out if isinstance(b.code_out, nn.Linear) else None
            if (code_in is None) != isinstance(b.code_in, nn.Identity) or (code_out is None) != isinstance(b.code_out, nn.Identity):
                return None
            params += [b.norm_attn.weight, b.norm_attn.bias, a.qkv_proj.weight, a.qkv_proj.bias, a.out_proj.weight,
                       a.out_proj.bias, b.norm_code.weight, b.norm_code.bias,
                       None if code_in is None else code_in.weight, None if code_in is None else code_in.bias,
                       codes.codebook,
                       None if code_out is None else code_out.weight, None if code_out is None else code_out.bias]
        params += [self.encoder.weight, self.encoder.bias, self.norm_out.weight, self.norm_out.bias,
                   self.decoder.weight, self.decoder.bias,
                   None if self.ar_skip is None else self.ar_skip.weight, None if self.ar_skip is None else self.ar_skip.bias]
        dtypes = {t.dtype for t in params if t is not None}
        if len(dtypes) != 1 or any(t.device.type != "cpu" for t in params if t is not None):
            return None
        heads, kv_heads, hd, rope, base, code_scale = shape
        sizes = [len(self.blocks), heads, kv_heads, hd, int(rope), int(self.residual)]
        scalars = [float(base), hd ** -0.5, float(code_scale), float(norms[0].eps)]
        return params, sizes, scalars, dtypes.pop()

    def _decode_native(self, x_t: torch.Tensor, cache: KVCache, native: tuple) -> torch.Tensor | None:
        """The whole step in one native call (``vqformer_decode_step``); None before the cache holds
        storage for every layer (the first append sizes it)."""
        params, sizes, scalars, _ = native
        if not cache.allocated():
            return None
        inputs, input_index = _NO_INPUTS, [0, 0, 0]
        kv, kv_index = cache.reserve_kv(1)
        if self.ar_skip is not None:
            inputs, input_index = cache.reserve_input()
        return torch.ops.vqext.vqformer_decode_step(x_t, params, kv, kv_index, inputs, input_index, sizes, scalars,
                                                    cache.pos)

    def _decode_one(self, x_t: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """One decoding step of the blocks' math, calling the functional ops and the native kernels
        directly: at T = 1 the modules' per-call overhead is most of the time (and under
        ``torch.inference_mode`` the native ops also skip the autograd layer). Kept equal to the
        module path by tests (tests/test_models.py: fast against module decoding)."""
        attn_op, rotate = torch.ops.vqext.rope_attention_fwd, torch.ops.vqext.apply_rope
        plan = self.__dict__.get("_plan")
        if plan is None:
            plan = self._plan = self._decode_plan()
        blocks, (encoder, norm_out, decoder, ar), native = plan
        if native is not None and x_t.dtype == native[3] and isinstance(cache.pos, int):
            y = self._decode_native(x_t, cache, native)
            if y is not None:
                return y
        B = x_t.shape[0]
        pos_int, pos_t = _split_offset(cache.pos, x_t.device)
        h = F.linear(x_t, *encoder)
        if self.input_pe is not None:
            h = self.input_pe(h, cache.pos)
        D = h.shape[-1]
        for layer, (norm_attn, qkv_proj, shape, out_proj, norm_code, code_in, code_out, codes,
                    block) in enumerate(blocks):
            heads, kv_heads, hd, rope, base, scale = shape
            qkv = F.linear(torch.layer_norm(h, *norm_attn), *qkv_proj)
            q = qkv[..., :heads * hd].view(B, 1, heads, hd).transpose(1, 2)
            kv, k_offset = cache.append_kv(
                layer, qkv[..., heads * hd:].view(B, 1, 2, kv_heads, hd).permute(2, 0, 3, 1, 4))
            k_all, v_all = kv[0], kv[1]
            if rope:  # as CausalSelfAttention: the new key is stored rotated (here rotated in place)
                new_key = k_all[..., -1:, :]
                new_key.copy_(rotate(new_key, pos_int, pos_t, base, False))
            k_int, k_t = _split_offset(k_offset, x_t.device)
            out = attn_op(q, k_all, v_all, pos_int, pos_t, k_int, k_t, True, rope, False, scale, base)[0]
            h = h + F.linear(out.transpose(1, 2).reshape(B, 1, D), *out_proj)
            if codes is not None:  # soft quantiser: attention over the head's codebook
                cq = torch.layer_norm(h, *norm_code)
                if code_in is not None:
                    cq = F.linear(cq, *code_in)
                codebook, code_scale = codes
                codebook = codebook.to(cq.dtype).unsqueeze(0)
                quantized = attn_op(cq.view(B, 1, heads, hd).transpose(1, 2), codebook, codebook, 0, None, 0, None,
                                    False, False, False, code_scale, 10000.0)[0]
            else:
                quantized, _ = block.quantize(block.code_queries(h))
            quantized = quantized.transpose(1, 2).reshape(B, 1, D)
            h = h + (F.linear(quantized, *code_out) if code_out is not None else block.code_out(quantized))
        y = F.linear(torch.layer_norm(h, *norm_out), *decoder)
        if ar is not None:
            history = cache.append_inputs(x_t)
            L, ar_weight, ar_bias = ar
            if history.shape[1] >= L:  # the filter is a dot product with the last L inputs
                y = y + F.linear(history[:, -L:].reshape(B, 1, L), ar_weight, ar_bias)
            else:
                y = y + self._ar(history, 1)
        return x_t + y if self.residual else y


_NO_INPUTS = torch.empty(0)  # the native step's input history when the model has no AR path


def _split_offset(offset, device) -> tuple[int, torch.Tensor | None]:
    """The native ops' (int, per-batch tensor) form of a position."""
    if isinstance(offset, torch.Tensor):
        return 0, offset.to(device=device, dtype=torch.int64).reshape(-1)
    return int(offset), None


