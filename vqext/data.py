"""Series, windows, normalisation and splits.

A series is a 1-D float64 array. It comes from a CSV file (long, wide, M4 or one column), a
bundled dataset (``bundled:airline`` / ``bundled:nile``, or just ``airline`` when no such file
exists), or a synthetic generator (``synthetic:sine``, ``synthetic:sine:500`` for 500 points);
reading lives in ``vqext.dataio`` and is re-exported here.

Windows of length ``T`` start at every index ``i``: input ``v[i:i+T]``, target ``v[i+1:i+T+1]``
(the input shifted by one step), so a series of ``n`` points gives ``n - T`` windows and needs at
least ``T + 2`` points (two windows: one to train on, one to validate).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from .dataio import (BUNDLED, DEFAULT_DATA, FILLS, FORMATS, MAX_ABS_VALUE, SYNTHETIC_DEFAULT_LENGTH,  # noqa: F401
                     SYNTHETIC_KINDS, DataWarning, Panel, Series, load_panel, load_series, parse_csv_text,
                     series_label, synthetic_series)
from .errors import DataError


# ------------------------------------------------------------------------- normalisation, windows
# A spread whose square underflows float64 (the mirror of MAX_ABS_VALUE), and a spread so small
# against the mean that float64 (53 bits, ~1e-16) keeps only a few digits of it.
TINY_SPREAD = 1e-150
RELATIVE_SPREAD = 1e-12


@dataclass(frozen=True)
class Normalizer:
    """z-score with the statistics of one series (the series being trained on or forecast)."""
    mean: float
    std: float

    @classmethod
    def fit(cls, values: np.ndarray, source: str = "series") -> "Normalizer":
        """Mean and population std; a degenerate spread is normalised but never silently (DataWarning)."""
        v = np.asarray(values, dtype=np.float64)
        mean = float(np.mean(v))
        std = float(np.std(v))
        if std < TINY_SPREAD:
            # Squares of deviations below ~1e-154 underflow, so np.std can read 0 for a series
            # that varies; scaling the deviations first gives its true spread.
            dev = v - mean
            top = float(np.max(np.abs(dev))) if v.size else 0.0
            std = top * float(np.std(dev / top)) if top > 0 else 0.0
        if std == 0:
            warnings.warn(f"{source} is constant ({mean:g}): normalised with std 1; a model can learn "
                          f"nothing from it", DataWarning, stacklevel=2)
            return cls(mean, 1.0)
        if std < TINY_SPREAD:
            warnings.warn(f"{source} has a tiny spread (std {std:.3g}): squared errors underflow in "
                          f"float64 below {TINY_SPREAD:g}, so MSEs read 0; rescale the series "
                          f"(multiply it by a power of ten)", DataWarning, stacklevel=2)
        elif std < RELATIVE_SPREAD * abs(mean):
            warnings.warn(f"{source} varies by std {std:.3g} around a mean of {mean:.6g} (relative "
                          f"spread {std / abs(mean):.1e} < {RELATIVE_SPREAD:g}): its variation is at the "
                          f"level of float64 rounding, so normalised values are mostly rounding noise; "
                          f"subtract an offset first", DataWarning, stacklevel=2)
        return cls(mean, std)

    def encode(self, values):
        return (values - self.mean) / self.std

    def decode(self, values):
        return values * self.std + self.mean

    def decode_after(self, values, last_value: float, last_encoded: float):
        """``decode(values)``, except that a value equal to ``last_encoded`` (the last observed value
        ``last_value`` as the model saw it) decodes to exactly ``last_value``: a model that repeats
        its last input (the naive forecast) is then not off by the scaling's rounding."""
        return np.where(np.asarray(values) == last_encoded, last_value, self.decode(values))

    def to_dict(self) -> dict:
        return {"mean": self.mean, "std": self.std}


def check_length(n: int, time_steps: int, source: str = "series") -> None:
    if time_steps < 1:
        raise DataError(f"--time-steps must be at least 1, got {time_steps}")
    if n < time_steps + 2:
        raise DataError(f"{source} has {n} points, too short for --time-steps {time_steps} "
                        f"(needs at least {time_steps + 2}); lower --time-steps")


def default_time_steps(n: int) -> int:
    """The log's 96 when the series is long enough for it, else a quarter of the series."""
    return 96 if n >= 3 * 96 else max(1, n // 4)


def make_windows(values, time_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All windows: inputs ``(N, T, 1)`` and targets ``(N, T, 1)`` (inputs shifted by one), N = n - T."""
    v = torch.as_tensor(np.asarray(values), dtype=torch.float32)
    check_length(len(v), time_steps)
    x = v.unfold(0, time_steps, 1)[:-1]       # windows starting at 0 .. n-T-1
    y = v[1:].unfold(0, time_steps, 1)        # the same windows one step later
    return x.unsqueeze(-1).contiguous(), y.unsqueeze(-1).contiguous()


def split_indices(n: int, val_fraction: float = 0.2, mode: str = "random", seed: int = 42) -> tuple[list[int], list[int]]:
    """Train / validation window indices.

    ``random`` matches ``torch.utils.data.random_split(range(n), [1 - f, f], generator seeded)``
    (the log's split: a random 80/20 of the windows with seed 42). ``chronological`` puts the
    last windows in validation.
    """
    if not 0 < val_fraction < 1:
        raise DataError(f"validation fraction must be between 0 and 1, got {val_fraction}")
    if n < 2:
        raise DataError(f"need at least 2 windows to split, got {n}")
    if mode == "random":
        fractions = [1 - val_fraction, val_fraction]
        lengths = [int(math.floor(n * f)) for f in fractions]
        for i in range(n - sum(lengths)):  # random_split hands the remainder out round-robin
            lengths[i % 2] += 1
        if min(lengths) == 0:
            lengths = [n - 1, 1] if lengths[1] == 0 else [1, n - 1]
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
        return perm[:lengths[0]], perm[lengths[0]:]
    if mode == "chronological":
        n_val = min(n - 1, max(1, int(round(n * val_fraction))))
        return list(range(n - n_val)), list(range(n - n_val, n))
    raise DataError(f"unknown split {mode!r}; choose random or chronological")


@dataclass
class Dataset:
    """Everything training needs from one series."""
    series: Series
    normalizer: Normalizer
    time_steps: int
    x: torch.Tensor        # (N, T, 1) normalised inputs
    y: torch.Tensor        # (N, T, 1) normalised targets
    train_idx: list[int]
    val_idx: list[int]


def prepare(series: Series, time_steps: int, split: str = "random", val_fraction: float = 0.2,
            split_seed: int = 42) -> Dataset:
    check_length(len(series), time_steps, series.source)
    norm = Normalizer.fit(series.values, series.source)
    x, y = make_windows(norm.encode(series.values), time_steps)
    tr, va = split_indices(x.shape[0], val_fraction, split, split_seed)
    return Dataset(series, norm, time_steps, x, y, tr, va)


def noise_floor(values: np.ndarray, window: int | None = None) -> dict:
    """The one-step noise floor: the residual variance of a least-squares autoregression on the
    last ``window`` values (with an intercept), corrected for the fitted coefficients.

    No forecaster should be expected to beat it much in MSE for one-step forecasts; errors are
    reported relative to it. For white noise on a smooth or periodic signal it is about the noise
    variance; for a random walk, the variance of its steps. ``window`` (the AR order) defaults to
    a tenth of the series, at least 2 and at most 32 (enough for a daily season of hourly data).
    """
    v = np.asarray(values, dtype=np.float64)
    n = len(v)
    p = int(window) if window is not None else min(32, max(2, n // 10))
    rows = n - p
    if p < 1 or rows - (p + 1) < max(4, p):  # too few equations to estimate p + 1 coefficients
        return {"window": p, "variance": float("nan"), "method": "ar"}
    scale = float(np.std(v)) or 1.0
    z = (v - float(np.mean(v))) / scale  # conditioning; the variance is scaled back below
    lags = np.lib.stride_tricks.sliding_window_view(z[:-1], p)  # row t: z[t .. t+p-1], predicting z[t+p]
    design = np.column_stack([lags, np.ones(rows)])
    target = z[p:]
    coef, *_ = np.linalg.lstsq(design, target, rcond=None)
    resid = target - design @ coef
    return {"window": p, "variance": float(resid @ resid / (rows - p - 1) * scale * scale), "method": "ar"}
