"""Series loading, windows, normalisation and splits.

A series is a 1-D float64 array. It comes from a CSV column (``path.csv``), a bundled dataset
(``bundled:airline`` / ``bundled:nile``, or just ``airline`` when no such file exists), or a
synthetic generator (``synthetic:sine``, ``synthetic:sine:500`` for 500 points).

Windows of length ``T`` start at every index ``i``: input ``v[i:i+T]``, target ``v[i+1:i+T+1]``
(the input shifted by one step), so a series of ``n`` points gives ``n - T`` windows and needs at
least ``T + 2`` points (two windows: one to train on, one to validate).
"""
from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass
from importlib import resources

import numpy as np
import torch

from .errors import DataError

BUNDLED = {
    "airline": "airline.csv",  # monthly international airline passengers 1949-1960 (thousands)
    "nile": "nile.csv",        # annual Nile flow at Aswan 1871-1970 (10^8 m^3)
}
DEFAULT_DATA = "bundled:airline"
SYNTHETIC_DEFAULT_LENGTH = 400


@dataclass(frozen=True)
class Series:
    values: np.ndarray  # float64, 1-D, finite
    name: str           # short label used in run directory names
    source: str         # what the user gave (path, bundled:NAME, synthetic:NAME)
    column: str         # the column name (or index) the values came from

    def __len__(self) -> int:
        return len(self.values)


# --------------------------------------------------------------------------------------- loading
def load_series(spec: str | None = None, column: str | int | None = None) -> Series:
    """Load a series from a CSV path, ``bundled:NAME`` or ``synthetic:NAME[:LENGTH[:SEED]]``."""
    spec = DEFAULT_DATA if spec in (None, "") else str(spec)
    if spec.startswith("synthetic:"):
        return synthetic_series(spec)
    if spec.startswith("bundled:") or (spec in BUNDLED and not os.path.exists(spec)):
        name = spec.split(":", 1)[1] if spec.startswith("bundled:") else spec
        if name not in BUNDLED:
            raise DataError(f"unknown bundled dataset {name!r}; choose one of {', '.join(sorted(BUNDLED))}")
        text = resources.files("vqext.datasets").joinpath(BUNDLED[name]).read_text(encoding="utf-8")
        values, col = parse_csv_text(text, column, source=f"bundled:{name}")
        return Series(values, name, f"bundled:{name}", col)
    if not os.path.exists(spec):
        raise DataError(f"data file not found: {spec} (give a CSV path, bundled:NAME or synthetic:NAME)")
    if os.path.isdir(spec):
        raise DataError(f"data path is a directory, not a CSV file: {spec}")
    try:
        with open(spec, encoding="utf-8-sig", newline="") as fh:
            text = fh.read()
    except UnicodeDecodeError as exc:
        raise DataError(f"{spec} is not a UTF-8 text CSV file ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise DataError(f"cannot read {spec}: {exc.strerror}") from None
    values, col = parse_csv_text(text, column, source=spec)
    return Series(values, series_label(spec), spec, col)


def series_label(path: str) -> str:
    """``../shared/data/y+w.csv`` -> ``y_w`` (the log's naming)."""
    stem = os.path.splitext(os.path.basename(path))[0]
    return "".join(c if c.isalnum() else "_" for c in stem).strip("_") or "data"


def _to_float(cell: str) -> float | None:
    try:
        return float(cell)
    except ValueError:
        return None


# Squares of the values (variances, MSEs) must stay finite in float64.
MAX_ABS_VALUE = 1e150


def parse_csv_text(text: str, column: str | int | None = None, source: str = "<csv>") -> tuple[np.ndarray, str]:
    """Parse CSV text into the values of one column.

    The first row is a header when any of its cells is not a number. ``column`` is a header name,
    a 0-based index (negative counts from the end) or None for the last numeric column.
    """
    try:
        rows = [r for r in csv.reader(text.splitlines()) if any(c.strip() for c in r)]
    except csv.Error as exc:  # e.g. a cell longer than the csv module's field limit (128 KiB)
        raise DataError(f"{source}: not a readable CSV file ({exc})") from None
    if not rows:
        raise DataError(f"{source}: the file is empty")
    header = None
    if any(_to_float(c.strip()) is None for c in rows[0]):
        header, rows = [c.strip() for c in rows[0]], rows[1:]
    if not rows:
        raise DataError(f"{source}: only a header row, no data")
    width = len(header) if header else max(len(r) for r in rows)

    index = _resolve_column(column, header, width, rows, source)
    label = header[index] if header else str(index)
    values = np.empty(len(rows), dtype=np.float64)
    for i, row in enumerate(rows):
        line = i + (2 if header else 1)
        if index >= len(row) or not row[index].strip():
            raise DataError(f"{source}: line {line} has no value in column {label!r}")
        v = _to_float(row[index].strip())
        if v is None:
            raise DataError(f"{source}: line {line}, column {label!r}: {row[index].strip()[:40]!r} is not a number")
        if not math.isfinite(v):
            raise DataError(f"{source}: line {line}, column {label!r}: {v} (NaN/inf values are not allowed)")
        if abs(v) > MAX_ABS_VALUE:
            raise DataError(f"{source}: line {line}, column {label!r}: {v:g} is too large (squared errors would "
                            f"overflow; values must be within +-{MAX_ABS_VALUE:g}, rescale the column)")
        values[i] = v
    return values, label


def _resolve_column(column, header, width, rows, source) -> int:
    if column is None or column == "":
        for j in range(width - 1, -1, -1):
            if all(j < len(r) and _to_float(r[j].strip()) is not None for r in rows):
                return j
        raise DataError(f"{source}: no column is entirely numeric; pick one with --column")
    if header and str(column) in header:
        return header.index(str(column))
    try:
        j = int(column)
    except (TypeError, ValueError):
        known = ", ".join(repr(h) for h in header) if header else f"indices 0..{width - 1}"
        raise DataError(f"{source}: no column {column!r}; available: {known}") from None
    if not -width <= j < width:
        raise DataError(f"{source}: column index {j} out of range (the file has {width} columns)")
    return j % width


# ------------------------------------------------------------------------------------ synthetic
def _synthetic_values(kind: str, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(n, dtype=np.float64)
    if kind == "sine":
        return np.sin(2 * np.pi * t / 25.0) + 0.05 * rng.standard_normal(n)
    if kind == "trend":  # trend + season + noise
        return 0.02 * t + np.sin(2 * np.pi * t / 20.0) + 0.2 * rng.standard_normal(n)
    if kind == "random-walk":
        return np.cumsum(rng.standard_normal(n))
    if kind == "constant":  # degenerate on purpose: zero variance (tests the normaliser guard)
        return np.full(n, 3.0)
    raise DataError(f"unknown synthetic series {kind!r}; choose one of {', '.join(SYNTHETIC_KINDS)}")


SYNTHETIC_KINDS = ("sine", "trend", "random-walk", "constant")


def synthetic_series(spec: str) -> Series:
    parts = spec.split(":")
    kind = parts[1] if len(parts) > 1 else ""
    try:
        n = int(parts[2]) if len(parts) > 2 else SYNTHETIC_DEFAULT_LENGTH
        seed = int(parts[3]) if len(parts) > 3 else 0
    except ValueError:
        raise DataError(f"bad synthetic spec {spec!r}; use synthetic:NAME[:LENGTH[:SEED]]") from None
    if n < 1:
        raise DataError(f"synthetic length must be positive, got {n}")
    return Series(_synthetic_values(kind, n, seed), f"syn_{kind.replace('-', '_')}", spec, "value")


# ------------------------------------------------------------------------- normalisation, windows
@dataclass(frozen=True)
class Normalizer:
    """z-score with the statistics of one series (the series being trained on or forecast)."""
    mean: float
    std: float

    @classmethod
    def fit(cls, values: np.ndarray) -> "Normalizer":
        std = float(np.std(values))
        # A constant series has no scale; 1.0 keeps it representable instead of dividing by zero.
        return cls(float(np.mean(values)), std if std > 0 else 1.0)

    def encode(self, values):
        return (values - self.mean) / self.std

    def decode(self, values):
        return values * self.std + self.mean

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
    norm = Normalizer.fit(series.values)
    x, y = make_windows(norm.encode(series.values), time_steps)
    tr, va = split_indices(x.shape[0], val_fraction, split, split_seed)
    return Dataset(series, norm, time_steps, x, y, tr, va)


def noise_floor(values: np.ndarray, window: int | None = None) -> dict:
    """A rough noise-floor estimate: the variance of the series around a centred moving average.

    No forecaster should be expected to beat it in MSE for one-step forecasts; errors are
    reported relative to it. ``window`` defaults to ~5% of the series (odd, at least 3).
    """
    v = np.asarray(values, dtype=np.float64)
    n = len(v)
    if window is None:
        window = max(3, (n // 20) | 1)
    window = min(window, n if n % 2 else n - 1) if n >= 3 else 1
    if window < 3:
        return {"window": window, "variance": float("nan")}
    kernel = np.ones(window) / window
    half = window // 2
    trend = np.convolve(v, kernel, mode="valid")
    resid = v[half:n - half] - trend
    return {"window": int(window), "variance": float(np.var(resid))}
