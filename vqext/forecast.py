"""One-step ("batch") and autoregressive ("regressive") forecasts, with or without a KV cache.

Positions (``start_pos``), for a series ``v[0..n-1]`` and window length ``T``:

* Training / one-step windows: the window starting at series index ``i`` gets ``start_pos = 0``
  when the run uses ``positions="window"`` (the log's behaviour and the default: every window
  is seen at positions ``0..T-1``) and ``start_pos = i`` with ``positions="series"``.
* Regressive, recomputing: the prediction of point ``t`` (``t >= T``) runs the model on the
  window ``v[t-T..t-1]`` (true values, then its own predictions) with ``start_pos`` as above
  (0, or ``t - T``) and keeps the last output.
* Regressive with ``cache=True``: the cache starts at position 0, the first ``T`` points are fed
  in one call (a prefill at positions ``0..T-1``), then every prediction is fed back at the next position,
  so step ``t`` sits at absolute position ``t`` and the cache keeps the last ``T`` keys. For a
  one-layer model whose encoding is relative (``rope``) or absent (``none``) attention only
  sees position differences, so this equals recomputation. Absolute encodings (``randn``,
  ``sinpe``) would see positions the model never trained on (or leave a fixed-length table):
  vqext says so and recomputes. Deeper models give (slightly) different numbers once the window
  slides, because cached keys of upper layers saw an older context.
"""
from __future__ import annotations

import itertools
import sys
import types
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from .data import Normalizer
from .models.base import next_value

def model_device(model) -> torch.device:
    """Where the model's tensors live (the CPU for a model without any, e.g. a naive baseline)."""
    for t in itertools.chain(model.parameters(), model.buffers()):
        return t.device
    return torch.device("cpu")


def pe_is_absolute(pe: str) -> bool:
    """Whether the encoding's class says attention sees absolute positions (``relative`` is False)."""
    try:
        from .registry import get_pe

        cls = get_pe(pe)
    except Exception:  # noqa: BLE001 - an unknown encoding: assume the worst
        return True
    return not getattr(cls, "relative", getattr(cls, "mode", "add") in ("identity", "rotate"))


@torch.no_grad()
def _translation_invariant(model, time_steps: int) -> bool:
    """Whether shifting a window's positions leaves the last output unchanged (attention that only
    sees position differences). The log's per-step models with rope are not: they see position t."""
    g = torch.Generator().manual_seed(0)
    device = model_device(model)
    x = torch.randn(1, time_steps, 1, generator=g).to(device)
    a = next_value(model, x, start_pos=0)[0, -1]
    b = next_value(model, x, start_pos=time_steps + 7)[0, -1]
    return bool(torch.allclose(a, b, rtol=1e-5, atol=1e-5 * float(a.abs().max().clamp(min=1e-6))))


def cache_usable(arch: str, pe: str) -> tuple[bool, str]:
    """Static part of :func:`cache_plan`: whether the architecture and encoding allow a cache at all."""
    from .registry import get_arch

    if not getattr(get_arch(arch), "supports_cache", False):
        return False, f"architecture {arch!r} has no KV cache; recomputing each window"
    if pe_is_absolute(pe):
        return False, (f"positional encoding {pe!r} is absolute: cached steps would sit at positions the model "
                       f"never saw in training; recomputing each window")
    return True, ""


def cache_plan(model, arch: str, pe: str, time_steps: int, positions: str = "window",
               depth: int = 1) -> tuple[bool, bool, str]:
    """(use the cache, equals recomputation, note) for this model and position convention."""
    usable, why = cache_usable(arch, pe)
    if not usable:
        return False, False, why
    if positions == "window" and pe != "none" and not _translation_invariant(model, time_steps):
        return False, False, (f"{arch} with {pe!r} depends on absolute positions, so cached steps (position t) would "
                              f"differ from windows recomputed at positions 0..T-1; recomputing each window "
                              f"(train with --positions series to decode it with the cache)")
    if depth > 1:
        return True, False, (f"depth {depth}: cached decoding differs slightly from recomputation once the window "
                             f"slides (upper-layer keys saw an older context)")
    return True, True, ""


def _start(positions: str, first_index):
    return 0 if positions == "window" else first_index


@torch.no_grad()
def one_step(model, values: np.ndarray, time_steps: int, positions: str = "window",
             batch_size: int = 512) -> np.ndarray:
    """Predictions of points ``T..n-1``, each from the ``T`` true points before it (normalised)."""
    model.eval()
    v = torch.as_tensor(values, dtype=torch.float32)
    windows = v.unfold(0, time_steps, 1)[:-1]  # (n - T, T): window i = v[i..i+T-1]
    device = model_device(model)
    out = []
    for b in range(0, windows.shape[0], batch_size):
        x = windows[b:b + batch_size].unsqueeze(-1).to(device)
        idx = torch.arange(b, b + x.shape[0], device=device)
        out.append(next_value(model, x, start_pos=_start(positions, idx))[:, -1, 0].float().cpu())
    return torch.cat(out).numpy().astype(np.float64)


@torch.inference_mode()  # also lets the native ops skip the autograd layer: most of a cached step's time
def regressive(model, values: np.ndarray, time_steps: int, horizon: int | None = None,
               positions: str = "window", cache: bool = False) -> np.ndarray:
    """Start from the first ``T`` points and roll ``horizon`` steps (default: to the series' end)."""
    model.eval()
    T = time_steps
    horizon = len(values) - T if horizon is None else int(horizon)
    device = model_device(model)
    context = torch.as_tensor(values[:T], dtype=torch.float32, device=device)
    if horizon <= 0:
        return np.empty(0)
    preds = torch.empty(horizon, dtype=torch.float32, device=device)
    if cache:
        state = model.init_cache(1, max_len=T, start_pos=0)
        y = model.step(context.view(1, T, 1), state)[:, -1:]  # prefill: the first window in one call
        outputs = [y]
        for _ in range(horizon - 1):
            y = model.step(y, state)
            outputs.append(y)
        return torch.cat(outputs).reshape(-1).cpu().numpy().astype(np.float64)
    window = torch.empty(T + horizon, dtype=torch.float32, device=device)
    window[:T] = context
    for s in range(horizon):
        x = window[s:s + T].view(1, T, 1)
        start = _start(positions, torch.tensor([s], device=device))
        preds[s] = next_value(model, x, start_pos=start)[0, -1, 0]
        window[T + s] = preds[s]
    return preds.cpu().numpy().astype(np.float64)


def error_metrics(truth: np.ndarray, pred: np.ndarray) -> dict:
    n = min(len(truth), len(pred))
    if n == 0:
        return {"mse": float("nan"), "mae": float("nan"), "points": 0}
    d = np.asarray(pred[:n]) - np.asarray(truth[:n])
    return {"mse": float(np.mean(d ** 2)), "mae": float(np.mean(np.abs(d))), "points": int(n)}


@dataclass
class ForecastResult:
    one_step: np.ndarray      # original units, predictions of points T..n-1
    regressive: np.ndarray    # original units, predictions of points T..T+horizon-1
    metrics: dict
    cache_note: str


def forecast_series(model, arch: str, pe: str, values: np.ndarray, time_steps: int, *,
                    positions: str = "window", horizon: int | None = None, cache: bool | str = False,
                    normalizer: Normalizer | None = None) -> ForecastResult:
    """Both forecasts of a series in original units, normalised with its own statistics by default.

    ``cache``: True decodes with the KV cache where that is exact and warns (and recomputes)
    where it is not; ``"auto"`` does the same silently; False always recomputes.
    """
    norm = normalizer or Normalizer.fit(values)
    z = norm.encode(np.asarray(values, dtype=np.float64))
    note = ""
    use_cache = False
    if cache:
        depth = int(getattr(model, "hparams", {}).get("depth", 1) or 1)
        use_cache, exact, note = cache_plan(model, arch, pe, time_steps, positions, depth)
        if cache == "auto":
            use_cache = use_cache and exact  # silently: only where it changes nothing but speed
        elif note:
            warnings.warn(note, stacklevel=2)
    batch = norm.decode(one_step(model, z, time_steps, positions))
    reg = norm.decode(regressive(model, z, time_steps, horizon, positions, cache=use_cache))
    truth = np.asarray(values[time_steps:], dtype=np.float64)
    metrics = {
        "batch": error_metrics(truth, batch),
        "regressive": error_metrics(truth, reg),
        "horizon": int(len(reg)),
        "cache": bool(use_cache),
    }
    return ForecastResult(batch, reg, metrics, note if cache else "")


@torch.no_grad()
def codebook_usage(model, x: torch.Tensor, start_pos=0) -> list[np.ndarray]:
    """How often each code is the nearest (hard VQ) or most-attended (soft VQ) one on inputs ``x``.

    Finds every sub-module with a ``codebook`` tensor and hooks its input; returns one count array
    per head per codebook module. Best effort: an empty list when no codebook can be matched.
    """
    from .ops.vq import nearest_code

    if hasattr(model, "code_indices"):  # the architecture knows which code each step uses
        model.eval()
        idx = model.code_indices(x, start_pos=start_pos)  # (B, T, heads)
        K = int(getattr(model, "hparams", {}).get("vocab_size", int(idx.max()) + 1))
        idx = idx.reshape(-1, idx.shape[-1]).cpu().numpy()
        return [np.bincount(idx[:, h], minlength=K) for h in range(idx.shape[1])]
    found = []
    hooks = []
    for name, mod in model.named_modules():
        cb = getattr(mod, "codebook", None)
        if isinstance(cb, torch.Tensor) and cb.dim() in (2, 3):
            metric = "l2" if "quantiz" in type(mod).__name__.lower() else "ip"

            def hook(m, args, _cb=cb, _metric=metric):
                if args and isinstance(args[0], torch.Tensor):
                    found.append((args[0].detach(), _cb.detach(), _metric))
            hooks.append(mod.register_forward_pre_hook(hook))
    try:
        model.eval()
        next_value(model, x, start_pos=start_pos)
    finally:
        for h in hooks:
            h.remove()
    counts = []
    for inp, cb, metric in found:
        try:
            if cb.dim() == 2:
                idx, _ = nearest_code(inp.reshape(-1, cb.shape[-1]).float(), cb.float(), metric)
                counts.append(np.bincount(idx.cpu().numpy().ravel(), minlength=cb.shape[0]))
            else:
                H, K, d = cb.shape
                if inp.dim() == 4 and inp.shape[1] == H:      # (B, H, T, d)
                    q = inp.permute(0, 2, 1, 3)
                else:                                          # (..., H*d) or (..., H, d)
                    q = inp.reshape(*inp.shape[:-1], H, d) if inp.shape[-1] == H * d else inp
                idx, _ = nearest_code(q.reshape(-1, H, d).float(), cb.float(), metric)
                idx = idx.cpu().numpy().reshape(-1, H)
                counts += [np.bincount(idx[:, h], minlength=K) for h in range(H)]
        except Exception:  # noqa: BLE001 - a plugin's codebook layout we cannot read: skip the plot
            continue
    return counts


class _CallableModule(types.ModuleType):
    """``vqext.forecast(run_or_model, data, horizon)`` is :func:`vqext.forecasting.forecast`.

    The public name ``vqext.forecast`` is both this module (whose functions stay importable as
    ``vqext.forecast.regressive`` etc.) and the forecasting call: an ordinary function of that
    name in ``vqext/__init__`` would be replaced by the module the first time anything imported it.
    """

    def __call__(self, run_or_model, data, horizon, **kwargs):
        from .forecasting import forecast

        return forecast(run_or_model, data, horizon, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
