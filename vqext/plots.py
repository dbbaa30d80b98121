"""PNG plots (matplotlib, Agg backend: no display needed), written atomically."""
from __future__ import annotations

import numpy as np

from .io import atomic_savefig


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _wrap(title: str, width: int = 90) -> str:
    """Run names are long; break titles after '_' or a space so they never run off the figure."""
    import re

    lines, line = [], ""
    for piece in re.findall(r"[^_ ]*[_ ]?", title):
        if line and len(line) + len(piece) > width:
            lines.append(line.rstrip())
            line = ""
        line += piece
    return "\n".join(lines + [line.rstrip()])


def plot_forecast(values, prediction, start: int, path: str, *, title: str, label: str,
                  context: int | None = None, x=None, xlabel: str = "step", ylabel: str = "value") -> None:
    """The series (truth) with a forecast of points ``start..start+len(prediction)-1`` over it."""
    plt = _plt()
    values = np.asarray(values)
    xs = np.arange(len(values)) if x is None else np.asarray(x)
    fig, ax = plt.subplots(figsize=(11, 4.2), dpi=110)
    ax.plot(xs, values, color="#1f77b4", lw=1.1, label="truth")
    if context:
        ax.axvspan(xs[0], xs[min(context, len(xs)) - 1], color="0.9", label=f"first window ({context} points)")
    n = min(len(prediction), max(0, len(values) - start))
    px = xs[start:start + n] if n else []
    ax.plot(px, np.asarray(prediction)[:n], color="#d62728", lw=1.1, label=label)
    if len(prediction) > n:  # forecast beyond the end of the series
        step = (xs[-1] - xs[-2]) if len(xs) > 1 else 1
        fx = xs[-1] + step * np.arange(1, len(prediction) - n + 1)
        ax.plot(fx, np.asarray(prediction)[n:], color="#d62728", lw=1.1, ls="--")
    ax.set_title(_wrap(title), fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    atomic_savefig(fig, path)
    plt.close(fig)


def plot_losses(history: list[dict], path: str, *, title: str) -> None:
    plt = _plt()
    epochs = [r["epoch"] for r in history]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot(epochs, [r["train_loss"] for r in history], marker=".", label="train")
    ax.plot(epochs, [r["val_loss"] for r in history], marker=".", label="validation")
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("MSE (normalised)")
    ax.set_title(_wrap(title), fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    atomic_savefig(fig, path)
    plt.close(fig)


def plot_codebook_usage(counts: list[np.ndarray], path: str, *, title: str) -> None:
    """One row per head: how often each code wins, codes sorted by use (a long tail = dead codes)."""
    plt = _plt()
    rows = max(1, len(counts))
    fig, axes = plt.subplots(rows, 1, figsize=(7, 1.6 + 1.4 * rows), dpi=110, squeeze=False)
    for h, (ax, c) in enumerate(zip(axes[:, 0], counts)):
        c = np.sort(np.asarray(c))[::-1]
        used = int((c > 0).sum())
        # One filled step artist instead of a bar per code: the same picture, drawn in a fraction
        # of the time at hundreds of codes x heads. Unused codes sit on the baseline.
        log = c.max() > 0
        ax.stairs(np.maximum(c, 0.5) if log else c, np.arange(len(c) + 1), fill=True, color="#2ca02c",
                  baseline=0.5 if log else 0)
        if log:
            ax.set_yscale("log")
        ax.set_ylabel(f"head {h}" if len(counts) > 1 else "count")
        ax.text(0.99, 0.85, f"{used}/{len(c)} codes used", transform=ax.transAxes, ha="right", fontsize=8)
    if not counts:
        axes[0, 0].text(0.5, 0.5, "no codebook found in this model", ha="center", va="center")
    axes[-1, 0].set_xlabel("code rank (by use)")
    fig.suptitle(_wrap(title), fontsize=10)
    fig.tight_layout()
    atomic_savefig(fig, path)
    plt.close(fig)


def plot_comparison(names: list[str], values: list[float], path: str, *, title: str, xlabel: str,
                    errors: list[float] | None = None, reference: float | None = None,
                    reference_label: str = "") -> None:
    """Horizontal bars, one per run or configuration (the report's overview)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.35 * len(names)), dpi=110)
    y = np.arange(len(names))
    ax.barh(y, values, xerr=errors, color="#1f77b4", alpha=0.85)
    ax.set_yticks(y)
    ax.set_yticklabels(names, fontsize=7)
    ax.invert_yaxis()
    if reference is not None and np.isfinite(reference):
        ax.axvline(reference, color="#d62728", ls="--", label=reference_label)
        ax.legend(fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_title(_wrap(title), fontsize=10)
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    atomic_savefig(fig, path)
    plt.close(fig)


def sample_series(ids: list, limit: int = 12) -> list:
    """At most ``limit`` ids spread evenly over ``ids`` (all of them when there are few)."""
    if len(ids) <= limit:
        return list(ids)
    picks = np.linspace(0, len(ids) - 1, limit).round().astype(int)
    return [ids[i] for i in picks]


def plot_future(histories: dict, forecast, path: str, *, title: str, limit: int = 12, tail: int | None = None) -> None:
    """Each sampled series' history (its last ``tail`` points) with its forecast, in a grid.

    ``histories`` maps id -> (x, values) (x: timestamps or indices); ``forecast`` is a DataFrame
    ``unique_id, step, ds, y_hat`` as :func:`vqext.forecasting.forecast` returns.
    """
    plt = _plt()
    ids = sample_series(list(histories), limit)
    cols = 1 if len(ids) == 1 else (2 if len(ids) <= 4 else 3)
    rows = -(-len(ids) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols if cols > 1 else 11, 3.0 * rows + 0.6), dpi=100,
                             squeeze=False)
    groups = dict(tuple(forecast.groupby("unique_id", sort=False)))
    for ax, uid in zip(axes.flat, ids):
        x, values = histories[uid]
        f = groups.get(uid)
        keep = len(values) if tail is None else min(len(values), tail)
        ax.plot(np.asarray(x)[-keep:], np.asarray(values)[-keep:], color="#1f77b4", lw=1.0, label="history")
        if f is not None:
            ax.plot(f["ds"].to_numpy(), f["y_hat"].to_numpy(), color="#d62728", lw=1.1, label="forecast")
        ax.set_title(str(uid), fontsize=9)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(ids):]:
        ax.set_visible(False)
    axes.flat[0].legend(loc="best", fontsize=7)
    shown = f" ({len(ids)} of {len(histories)} series)" if len(ids) < len(histories) else ""
    fig.suptitle(_wrap(title + shown), fontsize=10)
    fig.tight_layout()
    atomic_savefig(fig, path)
    plt.close(fig)
