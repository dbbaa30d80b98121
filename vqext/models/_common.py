"""Validation and building blocks shared by the built-in architectures."""
from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import ConfigError
from ..nn.attention import CodebookAttention

QUANTIZERS = ("soft", "hard")


def check_common(arch: str, hp: dict) -> None:
    """Types and ranges of the hyper-parameter names shared by the built-in architectures."""
    for name in ("vocab_size", "d_model", "heads", "depth", "time_steps"):
        if name in hp:
            value = hp[name]
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{arch}: {name} must be a positive integer, got {value!r}")
    if "kv_heads" in hp and hp["kv_heads"] is not None:
        kv = hp["kv_heads"]
        if isinstance(kv, bool) or not isinstance(kv, int) or kv < 1:
            raise ConfigError(f"{arch}: kv_heads must be None or a positive integer, got {kv!r}")
        if hp["heads"] % kv:
            raise ConfigError(f"{arch}: heads {hp['heads']} must be a multiple of kv_heads {kv}; "
                              f"choose kv_heads among {divisors(hp['heads'])}")
    if "quantizer" in hp and hp["quantizer"] not in QUANTIZERS:
        raise ConfigError(f"{arch}: quantizer must be 'soft' (codebook attention) or 'hard' (VectorQuantizer), "
                          f"got {hp['quantizer']!r}")
    if "freeze_codebook" in hp and not isinstance(hp["freeze_codebook"], bool):
        raise ConfigError(f"{arch}: freeze_codebook must be true or false, got {hp['freeze_codebook']!r}")
    scale = hp.get("codebook_scale")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                              or not math.isfinite(scale) or scale <= 0):
        raise ConfigError(f"{arch}: codebook_scale must be a positive number or None "
                          f"(None = 1/sqrt(d_model), as the log), got {scale!r}")
    weight = hp.get("commitment_weight")
    if weight is not None and (isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0):
        raise ConfigError(f"{arch}: commitment_weight must be a number >= 0, got {weight!r}")


def divisors(n: int) -> list[int]:
    return [i for i in range(1, n + 1) if n % i == 0]


def head_size(arch: str, d_model: int, heads: int) -> int:
    if d_model % heads:
        raise ConfigError(f"{arch}: d_model {d_model} is not divisible by heads {heads}; "
                          f"choose heads among {divisors(d_model)} or change d_model")
    return d_model // heads


def check_pe_width(arch: str, pe: str, pe_cls, width: int, time_steps: int, what: str) -> None:
    """Ask the encoding whether it works on ``width`` (``what`` says where that width comes from)."""
    problem = pe_cls.check(width, time_steps)
    if problem:
        raise ConfigError(f"{arch}: {pe} needs {problem}: {what}; change d_model or heads so that it does")


def check_attention_pe(arch: str, pe: str, hp: dict, positions: int, added_to: str) -> None:
    """Whether encoding ``pe`` fits an attention model of ``hp``'s d_model and heads over
    ``positions`` positions: rotated per head (``rotate``) or added to ``added_to`` (``add``)."""
    from ..registry import get_pe

    hd = head_size(arch, hp["d_model"], hp["heads"])
    pe_cls = get_pe(pe)
    if pe_cls.mode == "rotate":
        check_pe_width(arch, pe, pe_cls, hd, positions, f"d_model {hp['d_model']} / heads {hp['heads']} gives "
                                                        f"head size {hd}")
    elif pe_cls.mode == "add":
        check_pe_width(arch, pe, pe_cls, hp["d_model"], positions,
                       f"it is added to {added_to} of width d_model {hp['d_model']}")
    elif pe_cls.mode != "identity":
        raise ConfigError(f"{arch}: encoding {pe!r} has mode {pe_cls.mode!r}; {arch} accepts encodings of mode "
                          f"'add', 'rotate' or 'identity'")


def init_hparams(model_cls, pe: str, hparams: dict) -> dict:
    """A model's hyper-parameters for ``__init__``: its defaults with ``hparams``, validated."""
    unknown = set(hparams) - set(model_cls.defaults)
    if unknown:
        raise TypeError(f"{model_cls.__name__} got unknown hyper-parameters {sorted(unknown)}")
    hp = {**model_cls.defaults, **hparams}
    model_cls.validate(pe, **hp)
    return hp


def check_input(model: nn.Module, x: torch.Tensor, name: str = "x") -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != 1:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{type(model).__name__}: {name} must be (B, T, 1), got {shape}")
    if not x.is_floating_point():
        raise ValueError(f"{type(model).__name__}: {name} must be a floating-point tensor, got {x.dtype}")


class Quantize(nn.Module):
    """Per-head quantisation of ``(B, H, T, head_size)``: soft (codebook attention) or hard.

    ``forward(h) -> (quantized, aux_loss)``; ``aux_loss`` is the hard quantiser's codebook and
    commitment loss (a zero scalar for soft). The hard path is the only place vqext's models touch
    ``vqext.nn.VectorQuantizer``: built as ``VectorQuantizer(num_codes, d_model, heads=H,
    commitment_weight=...)`` (one codebook per head of ``d_model / H``), called on
    ``(B, T, d_model)``, and read as ``result[0]`` (quantized, straight-through), ``result[1]``
    (indices) and ``result.loss`` (or ``result[2]["loss"]``).
    """

    def __init__(self, kind: str, num_codes: int, d_model: int, heads: int, scale: float | None,
                 freeze: bool, commitment_weight: float = 0.25):
        super().__init__()
        self.kind = kind
        self.heads = heads
        if kind == "soft":
            self.codes = CodebookAttention(num_codes, d_model, heads=heads,
                                           scale=d_model ** -0.5 if scale is None else scale, freeze=freeze)
        else:
            try:
                from ..nn.quantizer import VectorQuantizer
            except ImportError as exc:  # pragma: no cover - only before the hard quantiser lands
                raise ConfigError(f"quantizer='hard' needs vqext.nn.VectorQuantizer, which failed to import: {exc}")
            self.codes = VectorQuantizer(num_codes, d_model, heads=heads, commitment_weight=commitment_weight)
            if freeze:
                for p in self.codes.parameters():
                    p.requires_grad_(False)

    def _hard(self, h: torch.Tensor):
        B, H, T, hd = h.shape
        result = self.codes(h.transpose(1, 2).reshape(B, T, H * hd))
        loss = result.loss if hasattr(result, "loss") else result[2]["loss"]
        return result[0].view(B, T, H, hd).transpose(1, 2), result[1], loss

    def forward(self, h: torch.Tensor):
        if self.kind == "soft":
            return self.codes(h), h.new_zeros(())
        quantized, _, loss = self._hard(h)
        return quantized, loss

    def codebook_usage_indices(self, h: torch.Tensor) -> torch.Tensor:
        """The code each position uses, ``(B, T, H)`` (argmax code for soft, the chosen code for hard)."""
        with torch.no_grad():
            if self.kind == "soft":
                return self.codes(h, return_indices=True)[1]
            indices = self._hard(h)[1]
            return indices.unsqueeze(-1) if self.heads == 1 else indices
