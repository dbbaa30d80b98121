"""Training and validation windows over one series or many, gathered on the fly.

Every series of a panel is scaled (z-score) and the scaled series are concatenated into one float32
tensor. A window is a start index into that tensor: input ``v[s:s+T]``, one-step targets
``v[s+1:s+T+1]`` and, for a direct multi-step head of horizon ``H``, the direct targets
``v[s+T:s+T+H]``. Windows never cross from one series into the next. Only the window table (start,
series) is stored, so M4 Hourly's ~330,000 windows cost a few megabytes, not ``T`` floats each.

Splits (``RunConfig.split``):

* ``tail``: the last ``val_size`` points of every series are its validation part; training windows
  lie wholly before it, and each series is scaled with the statistics of its training part (the
  points before the validation tail) when ``normalize="train"``. A validation window predicts points
  of the tail from the ``T`` points before it: its last one-step target (rollout models) or its
  ``H`` direct targets, starting in the tail, are what the validation loss scores.
  ``val_size=0`` trains on everything (the forecast origin is then the end of every series).
* ``random`` / ``chronological``: the seed's splits of one series' windows (a seeded random 80/20,
  or the last windows), applied to each series' windows. ``random`` over a single series with
  ``normalize="series"`` gives exactly the windows, order and numbers of the seed protocol.

``normalize``: ``series`` scales a series with all of its points (the seed's protocol, which lets
the validation part's level leak into training); ``train`` with its training part only.
"""
from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass

import numpy as np
import torch

from .data import Normalizer, split_indices
from .errors import DataError

SPLITS = ("random", "chronological", "tail")
NORMALIZE = ("series", "train")


def default_normalize(split: str) -> str:
    """Training statistics for the honest split, the series' own for the seed's window splits."""
    return "train" if split == "tail" else "series"


def tail_size(n: int, val_size: int | None, val_fraction: float, horizon: int) -> int:
    """Validation points of a series of ``n`` points: ``val_size``, else the forecast horizon, else a fraction."""
    if val_size is not None:
        return int(val_size)
    if horizon:
        return int(horizon)
    return max(1, int(round(n * val_fraction)))


@dataclass
class WindowSet:
    """Everything the training loop reads: scaled values, the window table and the split."""
    values: torch.Tensor        # (sum of lengths,) float32, every series scaled, concatenated
    offsets: np.ndarray         # (S,) int64 start of each series in ``values``
    lengths: np.ndarray         # (S,) int64 points of each series
    train_points: np.ndarray    # (S,) points in each series' training part
    ids: list[str]
    scalers: dict[str, Normalizer]
    time_steps: int
    horizon: int                # direct targets per window (0: no direct head)
    starts: torch.Tensor        # (W,) int64 start of each window in ``values``
    series: torch.Tensor        # (W,) int64 series of each window
    train_idx: torch.Tensor     # window ids to train on
    val_idx: torch.Tensor       # window ids to validate on
    val_last_only: bool         # validation scores only the targets in the tail (split "tail")

    @property
    def normalizer(self) -> Normalizer | None:
        """The one scaler of a single-series set (what single-series reports show), else None."""
        return next(iter(self.scalers.values())) if len(self.scalers) == 1 else None

    def local_start(self, ids: torch.Tensor) -> torch.Tensor:
        """Position of each window's first step within its own series."""
        return self.starts[ids] - torch.as_tensor(self.offsets)[self.series[ids]]

    def gather(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Inputs ``(B, T, 1)``, one-step targets ``(B, T, 1)`` and direct targets ``(B, H, 1)`` (or None)."""
        T, H = self.time_steps, self.horizon
        span = torch.arange(T + max(H, 1))
        seg = self.values[self.starts[ids].unsqueeze(1) + span]
        x = seg[:, :T].unsqueeze(-1)
        y = seg[:, 1:T + 1].unsqueeze(-1)
        direct = seg[:, T:T + H].unsqueeze(-1) if H else None
        return x, y, direct

    @property
    def x(self):
        """Indexable view: ``x[ids]`` gathers those windows' inputs (what reports read)."""
        return _View(self, 0)

    @property
    def y(self):
        """Indexable view: ``y[ids]`` gathers those windows' one-step targets."""
        return _View(self, 1)

    def scalers_table(self) -> str:
        """CSV (unique_id, mean, std, train_points, points) of every series' scaling."""
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["unique_id", "mean", "std", "train_points", "points"])
        for i, uid in enumerate(self.ids):
            s = self.scalers[uid]
            w.writerow([uid, repr(s.mean), repr(s.std), int(self.train_points[i]), int(self.lengths[i])])
        return buf.getvalue()


class _View:
    def __init__(self, ws: WindowSet, part: int):
        self.ws, self.part = ws, part

    def __getitem__(self, ids):
        return self.ws.gather(torch.as_tensor(ids, dtype=torch.long).reshape(-1))[self.part]


def series_uid(series, index: int) -> str:
    """A series' id: ``uid`` where the loader gives one, else its name (one series), else its index."""
    uid = getattr(series, "uid", None)
    return str(uid) if uid not in (None, "") else (getattr(series, "name", None) or str(index))


def build(panel, time_steps: int, *, split: str = "random", normalize: str | None = None,
          val_fraction: float = 0.2, split_seed: int = 42, val_size: int | None = None,
          horizon: int = 0, forecast_horizon: int = 0) -> WindowSet:
    """Windows of every series of ``panel`` (anything iterable over objects with ``values``).

    ``horizon``: direct targets per window (the model's direct head; 0 = none). ``forecast_horizon``:
    the horizon the run is for, the default validation tail (else ``horizon``, else ``val_fraction``).
    """
    if split not in SPLITS:
        raise DataError(f"--split must be one of {', '.join(SPLITS)}, got {split!r}")
    normalize = normalize or default_normalize(split)
    if normalize not in NORMALIZE:
        raise DataError(f"--normalize must be one of {', '.join(NORMALIZE)}, got {normalize!r}")
    if val_size is not None and val_size < 0:
        raise DataError(f"--val-size must be >= 0, got {val_size}")
    T, H = int(time_steps), int(horizon)
    if T < 1:
        raise DataError(f"--time-steps must be at least 1, got {T}")
    reach = max(H, 1)  # points a window needs after its inputs
    chunks, ids, scalers = [], [], {}
    starts, owners, train_ids, val_ids = [], [], [], []
    offsets, lengths, train_points = [], [], []
    offset = n_windows = 0
    for i, s in enumerate(panel):
        v = np.asarray(s.values, dtype=np.float64)
        n = len(v)
        uid = series_uid(s, i)
        if uid in scalers:
            raise DataError(f"series id {uid!r} appears twice in {getattr(panel, 'source', 'the data')}")
        local_train, local_val, n_train = _split_series(n, T, reach, split, val_fraction, split_seed,
                                                        tail_size(n, val_size, val_fraction, forecast_horizon or H)
                                                        if split == "tail" else 0)
        if n_train < 1:
            raise DataError(f"series {uid!r} has {n} points, all of them validation (--val-size {n - n_train}); "
                            f"lower --val-size")
        scaler = Normalizer.fit(v if normalize == "series" else v[:n_train])
        scalers[uid] = scaler
        chunks.append(scaler.encode(v))
        ids.append(uid)
        offsets.append(offset)
        lengths.append(n)
        train_points.append(n_train)
        starts.append(local_train + offset)
        starts.append(local_val + offset)
        owners.append(np.full(len(local_train) + len(local_val), i, dtype=np.int64))
        train_ids.append(np.arange(n_windows, n_windows + len(local_train)))
        val_ids.append(np.arange(n_windows + len(local_train), n_windows + len(local_train) + len(local_val)))
        n_windows += len(local_train) + len(local_val)
        offset += n
    if not ids:
        raise DataError("no series to train on")
    train_idx = torch.as_tensor(np.concatenate(train_ids), dtype=torch.long)
    val_idx = torch.as_tensor(np.concatenate(val_ids), dtype=torch.long)
    if len(train_idx) == 0:
        shortest = min(lengths)
        raise DataError(f"no training windows: the longest training part is {max(train_points)} points, a window "
                        f"needs {T + reach} (--time-steps {T}{f' + --horizon {H}' if H else ' + 1'}); the shortest "
                        f"series has {shortest}; lower --time-steps or --val-size")
    if len(val_idx) == 0:
        if split == "tail" and val_size == 0:
            pass  # --val-size 0: train on everything, no validation
        else:
            raise DataError(f"no validation windows: every series is too short for --time-steps {T} with its "
                            f"validation part; lower --time-steps, or raise --val-size")
    # Window ids run series by series, training windows then validation ones, each in the order
    # the split gave: one series' ids map to the seed's window indices in the seed's order.
    table = torch.as_tensor(np.concatenate(starts), dtype=torch.long)
    values = torch.as_tensor(np.concatenate(chunks), dtype=torch.float32)
    return WindowSet(values, np.asarray(offsets, dtype=np.int64), np.asarray(lengths, dtype=np.int64),
                     np.asarray(train_points, dtype=np.int64), ids, scalers, T, H, table,
                     torch.as_tensor(np.concatenate(owners)), train_idx, val_idx, split == "tail")


def _split_series(n: int, T: int, reach: int, split: str, val_fraction: float, split_seed: int,
                  tail: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(training window starts, validation window starts, training points) of a series of ``n`` points."""
    if split == "tail":
        n_train = n - tail
        local_train = np.arange(0, max(0, n_train - T - reach + 1))
        # Each validation window predicts from the T points before the tail point it starts at.
        local_val = np.arange(max(0, n_train - T), max(0, n - T - reach + 1)) if tail else np.arange(0)
        return local_train, local_val, n_train
    count = n - T - reach + 1  # the seed's n - T windows for a one-step model
    if count < 2:
        return np.arange(0), np.arange(0), n
    tr, va = split_indices(count, val_fraction, split, split_seed)
    local_train, local_val = np.asarray(tr, dtype=np.int64), np.asarray(va, dtype=np.int64)
    # random: validation windows interleave, so the training part is the whole series
    n_train = n if split == "random" else int(local_train.max()) + T + reach
    return local_train, local_val, n_train


def scalers_to_dict(scalers: dict[str, Normalizer]) -> dict[str, dict]:
    return {uid: s.to_dict() for uid, s in scalers.items()}


def scalers_from_dict(d: dict) -> dict[str, Normalizer]:
    out = {}
    for uid, s in d.items():
        mean, std = float(s["mean"]), float(s["std"])
        if not (math.isfinite(mean) and math.isfinite(std) and std > 0):
            raise DataError(f"saved scaler of series {uid!r} is invalid (mean {mean}, std {std})")
        out[str(uid)] = Normalizer(mean, std)
    return out
