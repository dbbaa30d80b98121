"""Fit a model over many series and forecast the points after the end of each (the Python API).

``fit(cfg, data)`` trains ``cfg`` on every series of ``data`` (windows from all of them, see
:mod:`vqext.windows`) and returns a :class:`Fitted` that holds the model, its config and the
per-series scaling statistics. ``forecast(run_or_model, data, horizon)`` predicts the ``horizon``
points after the end of every series of ``data`` and returns a DataFrame
``unique_id, step (1..H), ds, y_hat``:

* ``origin="end"`` (default): each forecast starts after the series' last point, from its last
  ``T`` points. ``normalize="train"`` (default) scales a series with the statistics the run saved
  for its id (those of its training part); a series the run never saw is scaled with its own
  history, which is everything observed. ``normalize="series"`` always uses the series' history.
* ``origin="start"``: the seed's protocol, rolling from the first ``T`` points over the rest of the
  series (an in-sample test; ``normalize="series"`` there uses the whole series, future included).

Models with a direct multi-step head (``supports_direct`` and a ``direct_horizon``) forecast
``H`` steps per call (``method="direct"``, their default); longer horizons chain such calls.
Others roll forward one step at a time (``method="rollout"``), with the KV cache where that gives
the same numbers as recomputing every window.

``ds`` continues the series' timestamps (their inferred frequency, else the last spacing) or,
for a series without timestamps, its integer index ``n..n+H-1``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import torch

from .data import Normalizer
from .errors import ConfigError, DataError
from .models.base import next_value

ORIGINS = ("end", "start")
METHODS = ("direct", "rollout")
#: Horizons beyond this many window lengths are refused: every step then feeds on predictions
#: made from predictions (nothing of the data is left in the window), and at a few ms per step
#: a typo such as --horizon 1000000 would otherwise run for an hour.
MAX_HORIZON_WINDOWS = 100


# ------------------------------------------------------------------------------------ the data
def as_panel(data, column=None, **data_options):
    """A Panel from a Panel, a Series, a list of Series, or a spec (path, bundled:NAME, synthetic:NAME);
    ``data_options`` (format, id_col, time_col, value_col, fill) go to :func:`vqext.data.load_panel`."""
    from .data import Panel, load_panel

    if isinstance(data, Panel):
        return data
    if isinstance(data, (list, tuple)) and data and all(hasattr(s, "values") for s in data):
        return Panel(tuple(data), "<series>", "series", "long")
    if hasattr(data, "values") and not isinstance(data, (str, os.PathLike)):
        return Panel((data,), getattr(data, "source", "<series>"), getattr(data, "name", "series"), "single")
    return load_panel(None if data is None else os.fspath(data), column=column, **data_options)


def series_uid(series, index: int) -> str:
    from .windows import series_uid as uid

    return uid(series, index)


def future_ds(ds, n: int, horizon: int) -> np.ndarray:
    """Timestamps of the ``horizon`` points after a series of ``n`` points with timestamps ``ds``."""
    if ds is None or len(ds) == 0:
        return np.arange(n, n + horizon)
    ds = np.asarray(ds)
    ahead = np.arange(1, horizon + 1)
    if np.issubdtype(ds.dtype, np.datetime64):
        import pandas as pd

        idx = pd.DatetimeIndex(ds)
        freq = pd.infer_freq(idx[-50:]) if len(idx) >= 3 else None
        if freq:
            return pd.date_range(idx[-1], periods=horizon + 1, freq=freq)[1:].values
        step = idx[-1] - idx[-2] if len(idx) > 1 else pd.Timedelta(1, "D")
        return (idx[-1] + step * ahead).values
    step = ds[-1] - ds[-2] if len(ds) > 1 else 1
    return ds[-1] + step * ahead


def points_ds(ds, n: int, first: int, horizon: int) -> np.ndarray:
    """Timestamps of points ``first..first+horizon-1`` of a series of ``n`` points (beyond ``n``: extrapolated)."""
    if ds is None or len(ds) == 0:
        return np.arange(first, first + horizon)
    ds = np.asarray(ds)
    known = ds[first:first + horizon]
    extra = horizon - len(known)
    return np.concatenate([known, future_ds(ds, n, extra)]) if extra > 0 else known


# ------------------------------------------------------------------------------------ fitting
@dataclass
class Fitted:
    """A trained model with what forecasting needs: its config and per-series statistics."""
    model: torch.nn.Module
    cfg: object                                  # vqext.config.RunConfig
    scalers: dict[str, Normalizer] = field(default_factory=dict)
    run_dir: str | None = None
    history: list = field(default_factory=list)

    def forecast(self, data, horizon: int, **kw):
        return forecast(self, data, horizon, **kw)


def direct_hparams(arch: str, horizon: int, direct: bool | None) -> dict:
    """``{"direct_horizon": H}`` when the run should train a direct head, else ``{}``.

    ``direct=None`` (default) trains one wherever the architecture supports it and a horizon is set;
    True insists (an error if the architecture cannot); False keeps the rollout model.
    """
    from .registry import get_arch

    cls = get_arch(arch)
    supported = bool(getattr(cls, "supports_direct", False))
    if not getattr(cls, "one_step", True):
        if direct is False:
            raise ConfigError(f"architecture {arch!r} forecasts directly and has no one-step outputs; drop --rollout")
    if direct and not supported:
        raise ConfigError(f"architecture {arch!r} has no direct multi-step head (see `vqext list`); use --rollout")
    if direct and not horizon:
        raise ConfigError("--direct needs --horizon H (the steps the head predicts)")
    return {"direct_horizon": int(horizon)} if horizon and supported and direct is not False else {}


def make_config(data=None, *, arch: str | None = None, pe: str | None = None, horizon: int = 0,
                direct: bool | None = None, time_steps: int | None = None, hparams: dict | None = None,
                split: str = "tail", **settings):
    """A :class:`~vqext.config.RunConfig` for forecasting: the recommended model and training, the
    ``tail`` split (validation: the last ``val_size`` points of each series, default the horizon),
    training-part statistics and, where the architecture has one, a direct head for ``horizon``.

    ``settings`` are further RunConfig fields (epochs, windows_per_epoch, seed, val_size, ...).
    """
    from dataclasses import fields

    from .config import RunConfig, TRAINING_DEFAULTS, resolve_training
    from .data import default_time_steps
    from .registry import get_arch, resolve_hparams

    if arch is None:
        from .registry import default_arch

        arch = default_arch(horizon)
    pe = pe or getattr(get_arch(arch), "recommended_pe", None) or "none"
    names = {f.name for f in fields(RunConfig)}
    unknown = set(settings) - names
    if unknown:
        raise ConfigError(f"make_config: unknown settings {sorted(unknown)}")
    if time_steps is None:
        panel = (as_panel(data, settings.get("column"), **settings.get("data_options", {}))
                 if data is not None else None)
        time_steps = default_time_steps(min(len(s.values) for s in panel) - horizon) if panel is not None else 96
    user = dict(hparams or {})
    user.update(direct_hparams(arch, horizon, direct))
    resolved = resolve_hparams(arch, pe, time_steps=time_steps, **user)
    training = resolve_training(arch, **{k: settings.pop(k) for k in list(settings) if k in TRAINING_DEFAULTS})
    source = data if isinstance(data, (str, os.PathLike)) or data is None else getattr(data, "source", None)
    cfg = RunConfig(arch=arch, pe=pe, hparams=resolved, user_hparams=user, data=source, time_steps=time_steps,
                    split=split, horizon=int(horizon), **training, **settings)
    cfg.validate()
    return cfg


def fit(cfg, data, run_dir: str | None = None, *, quiet: bool = True) -> Fitted:
    """Train ``cfg`` on every series of ``data`` (a Panel, a Series or a spec).

    With ``run_dir`` the run's files (config, checkpoint with the scalers, scalers.csv, history)
    are written there; without it nothing is written.
    """
    from .train import train

    panel = as_panel(data, getattr(cfg, "column", None), **getattr(cfg, "data_options", {}))
    result = train(cfg, run_dir, quiet=quiet, data=panel)
    return Fitted(result.model.cpu().eval(), cfg, dict(result.dataset.scalers), run_dir, result.history)


def load(run_dir: str) -> Fitted:
    """A :class:`Fitted` from a run directory (scalers from its checkpoint; none for older runs)."""
    from .checkpoint import load_run
    from .windows import scalers_from_dict

    cfg, model, ckpt = load_run(run_dir)
    return Fitted(model, cfg, scalers_from_dict(ckpt.get("scalers", {})), run_dir)


def _as_fitted(run_or_model) -> Fitted:
    if isinstance(run_or_model, Fitted):
        return run_or_model
    if isinstance(run_or_model, (str, os.PathLike)):
        return load(os.fspath(run_or_model))
    if isinstance(run_or_model, torch.nn.Module):
        from .config import RunConfig

        meta = getattr(run_or_model, "vqext_config", None) or {}
        hp = meta.get("hparams") or getattr(run_or_model, "hparams", {}) or {}
        if "time_steps" not in hp:
            raise ConfigError("forecast: the model does not say its window length (hparams['time_steps']); "
                              "pass a run directory or a Fitted from vqext.forecasting.fit")
        cfg = RunConfig(arch=meta.get("arch", type(run_or_model).__name__), pe=meta.get("pe", "none"),
                        hparams=dict(hp), time_steps=int(hp["time_steps"]))
        return Fitted(run_or_model.eval(), cfg)
    raise ConfigError(f"forecast: expected a run directory, a Fitted or a model, got {type(run_or_model).__name__}")


# ---------------------------------------------------------------------------------- forecasting
def check_horizon(horizon, time_steps: int) -> int:
    if isinstance(horizon, bool) or not isinstance(horizon, (int, np.integer)) or horizon < 1:
        raise ConfigError(f"--horizon must be a positive integer, got {horizon!r}")
    limit = MAX_HORIZON_WINDOWS * time_steps
    if horizon > limit:
        raise ConfigError(f"--horizon {horizon} is more than {MAX_HORIZON_WINDOWS} window lengths ({limit} steps for "
                          f"--time-steps {time_steps}); every step that far ahead is a prediction from predictions. "
                          f"Ask for at most {limit}")
    return int(horizon)


def default_method(model) -> str:
    return "direct" if getattr(model, "direct_horizon", 0) else "rollout"


def forecast(run_or_model, data, horizon: int, *, origin: str = "end", normalize: str | None = None,
             method: str | None = None, cache: bool | str = "auto", column=None, progress: bool = False,
             batch_size: int = 512):
    """Forecast ``horizon`` points of every series of ``data``; a DataFrame ``unique_id, step, ds, y_hat``.

    ``normalize`` defaults to ``"train"`` at ``origin="end"`` and ``"series"`` at ``origin="start"``
    (the seed's protocol). ``method`` defaults to the model's direct head where it has one.
    """
    import pandas as pd

    fitted = _as_fitted(run_or_model)
    model, cfg = fitted.model, fitted.cfg
    T = int(cfg.time_steps)
    if origin not in ORIGINS:
        raise ConfigError(f"--origin must be one of {', '.join(ORIGINS)}, got {origin!r}")
    normalize = normalize or ("train" if origin == "end" else "series")
    if normalize not in ("train", "series"):
        raise ConfigError(f"--normalize must be train or series, got {normalize!r}")
    method = method or default_method(model)
    if method not in METHODS:
        raise ConfigError(f"--method must be direct or rollout, got {method!r}")
    if method == "direct" and not getattr(model, "direct_horizon", 0):
        raise ConfigError(f"{cfg.arch} in this run has no direct head (train with --horizon H and an architecture "
                          f"that supports it, see `vqext list`); use --rollout")
    horizon = check_horizon(horizon, T)
    panel = as_panel(data, column)
    uids, contexts, last_values, starts, scalers, lengths, stamps = [], [], [], [], [], [], []
    for i, s in enumerate(panel):
        uid = series_uid(s, i)
        v = np.asarray(s.values, dtype=np.float64)
        if origin == "start" and len(v) < T:
            raise DataError(f"series {uid!r} has {len(v)} points, fewer than the window length {T}")
        known = fitted.scalers.get(uid) if normalize == "train" else None
        scaler = known or Normalizer.fit(v)
        ctx = v[:T] if origin == "start" else v[-T:]
        # A history shorter than the window is padded with its first value, as the AR path pads.
        ctx = np.concatenate([np.full(T - len(ctx), ctx[0]), ctx]) if len(ctx) < T else ctx
        uids.append(uid)
        contexts.append(scaler.encode(ctx))
        last_values.append(ctx[-1])
        starts.append(0 if origin == "start" else max(0, len(v) - T))
        scalers.append(scaler)
        lengths.append(len(v))
        stamps.append(getattr(s, "ds", None))
    contexts = np.stack(contexts)
    last_encoded = contexts[:, -1].astype(np.float32)  # what the model sees
    z = roll(model, contexts, horizon, positions=getattr(cfg, "positions", "window"),
             start=np.asarray(starts), method=method, cache=cache, arch=cfg.arch, pe=cfg.pe, progress=progress,
             batch_size=batch_size)
    frames = []
    for i, uid in enumerate(uids):
        first = T if origin == "start" else lengths[i]
        frames.append(pd.DataFrame({"unique_id": uid, "step": np.arange(1, horizon + 1),
                                    "ds": points_ds(stamps[i], lengths[i], first, horizon),
                                    "y_hat": scalers[i].decode_after(z[i], last_values[i], last_encoded[i])}))
    return pd.concat(frames, ignore_index=True)


@torch.inference_mode()
def roll(model, contexts: np.ndarray, horizon: int, *, positions: str = "window", start=None,
         method: str = "rollout", cache: bool | str = "auto", arch: str | None = None, pe: str = "none",
         progress: bool = False, batch_size: int = 512) -> np.ndarray:
    """Normalised forecasts ``(S, horizon)`` from normalised windows ``contexts`` ``(S, T)``, all series at once.

    ``start`` (per series) is the absolute position of each context's first step, used when the
    run's ``positions`` is ``series``. Rollout decodes with the KV cache when ``cache`` allows and
    the cache gives the numbers recomputation would (see :func:`vqext.forecast.cache_plan`).
    """
    from .forecast import cache_plan, model_device

    model.eval()
    S, T = contexts.shape
    device = model_device(model)
    start = torch.zeros(S, dtype=torch.long) if start is None else torch.as_tensor(start, dtype=torch.long)
    use_cache = False
    if (method == "rollout" and cache and positions == "window" and arch is not None
            and getattr(model, "supports_cache", False)):
        depth = int(getattr(model, "hparams", {}).get("depth", 1) or 1)
        usable, exact, _ = cache_plan(model, arch, pe, T, positions, depth)
        use_cache = usable and (exact or cache is True)
    chunk = getattr(model, "direct_horizon", 0) if method == "direct" else 1
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=horizon * S, desc="forecast", unit="step", unit_scale=True, dynamic_ncols=True)
    out = np.empty((S, horizon), dtype=np.float64)
    try:
        for b in range(0, S, batch_size):
            ctx = torch.as_tensor(contexts[b:b + batch_size], dtype=torch.float32, device=device)
            pos = start[b:b + batch_size].to(device)
            B = ctx.shape[0]
            if use_cache:
                preds = _roll_cached(model, ctx, horizon, bar)
            else:
                window = ctx.unsqueeze(-1)
                done, parts = 0, []
                while done < horizon:
                    k = min(chunk, horizon - done)
                    where = 0 if positions == "window" else pos + done
                    step = (model.forecast_direct(window, k, start_pos=where) if method == "direct"
                            else next_value(model, window, start_pos=where))
                    parts.append(step.float())
                    window = torch.cat((window, step.to(window.dtype)), 1)[:, -T:]
                    done += k
                    if bar is not None:
                        bar.update(k * B)
                preds = torch.cat(parts, 1)
            out[b:b + B] = preds.reshape(B, horizon).cpu().numpy()
    finally:
        if bar is not None:
            bar.close()
    return out


def _roll_cached(model, ctx: torch.Tensor, horizon: int, bar) -> torch.Tensor:
    B, T = ctx.shape
    state = model.init_cache(B, max_len=T, start_pos=0)
    y = model.step(ctx.view(B, T, 1), state)[:, -1:]  # prefill: the whole window in one call
    outputs = [y]
    for _ in range(horizon - 1):
        y = model.step(y, state)
        outputs.append(y)
        if bar is not None:
            bar.update(B)
    if bar is not None:
        bar.update(B)
    return torch.cat(outputs, 1).float()


__all__ = ["fit", "forecast", "load", "Fitted", "roll", "future_ds", "as_panel", "check_horizon"]
