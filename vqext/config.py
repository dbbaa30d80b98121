"""Run configuration and atomic file writes.

Every file vqext writes goes through :func:`atomic_write_bytes`: the bytes land in a temporary
file in the same directory, are flushed to disk, and replace the target with ``os.replace`` (atomic
on POSIX and Windows). A reader, or a process killed mid-write, never sees half a file.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.json"
HISTORY_FILE = "metrics.jsonl"
CHECKPOINT_FILE = "checkpoint.pt"


# ------------------------------------------------------------------------------- atomic writes
def atomic_write_bytes(path: str, data: bytes) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def atomic_write_text(path: str, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, allow_nan=True) + "\n")


def atomic_savefig(fig, path: str, **kwargs) -> None:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", **kwargs)
    atomic_write_bytes(path, buf.getvalue())


# ------------------------------------------------------------------------------- configuration
@dataclass
class RunConfig:
    """Everything that determines a run; stored as ``config.json`` in the run directory."""
    arch: str
    pe: str = "none"
    hparams: dict = field(default_factory=dict)        # resolved: create_model(arch, pe, **hparams)
    user_hparams: dict = field(default_factory=dict)   # what the user set explicitly
    data: str | None = None                            # CSV path, bundled:NAME, synthetic:NAME
    column: str | None = None
    time_steps: int = 96
    epochs: int = 50
    lr: float = 0.007
    batch_size: int = 32
    seed: int = 0
    split: str = "random"
    val_fraction: float = 0.2
    split_seed: int = 42
    positions: str = "window"   # "window": each window starts at position 0 (the seed); "series"
    device: str = "auto"

    def validate(self) -> None:
        if self.epochs < 1:
            raise ConfigError(f"--epochs must be at least 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be at least 1, got {self.batch_size}")
        if not self.lr > 0:
            raise ConfigError(f"--lr must be positive, got {self.lr}")
        if self.positions not in ("window", "series"):
            raise ConfigError(f"--positions must be 'window' or 'series', got {self.positions!r}")
        if self.split not in ("random", "chronological"):
            raise ConfigError(f"--split must be 'random' or 'chronological', got {self.split!r}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ConfigError(f"--device must be auto, cpu or cuda, got {self.device!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ConfigError(f"config has unknown keys {sorted(unknown)} (written by a newer vqext?)")
        return cls(**d)

    def label(self, data_label: str) -> str:
        """The seed's naming: ``mhvqlnmlp_rope_vs512_dm64_nh8_y_w_ts96_lr0.007`` (+ seed)."""
        h = self.hparams
        parts = [self.arch]
        if self.pe != "none":
            parts.append(self.pe)
        if "vocab_size" in h:
            parts.append(f"vs{h['vocab_size']}")
        if "d_model" in h:
            parts.append(f"dm{h['d_model']}")
        if "heads" in h and h["heads"] != 1:
            parts.append(f"nh{h['heads']}")
        if "depth" in h and h["depth"] != 1:
            parts.append(f"dp{h['depth']}")
        defaults = _arch_defaults(self.arch)
        if h.get("quantizer", "soft") != "soft":
            parts.append(str(h["quantizer"]))
        if "freeze_codebook" in h and bool(h["freeze_codebook"]) != bool(defaults.get("freeze_codebook", False)):
            parts.append("fz" if h["freeze_codebook"] else "tcb")  # only when it differs from the arch's default
        parts += [data_label, f"ts{self.time_steps}", f"lr{self.lr:g}", f"s{self.seed}"]
        return "_".join(parts)


def _arch_defaults(arch: str) -> dict:
    try:
        from .registry import get_arch

        return dict(getattr(get_arch(arch), "defaults", {}) or {})
    except Exception:  # noqa: BLE001 - naming must not fail on a plugin problem
        return {}


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda requested but no CUDA device is available; use --device cpu")
    return device


def new_run_dir(root: str, label: str) -> str:
    """``root/label/YYYY-mm-dd-HH-MM-SS`` (``-2``, ``-3`` ... on a clash), created race-free."""
    stamp = _dt.datetime.now().strftime("%Y-%m-%d-%H-%M-%S")
    parent = os.path.join(root, label)
    os.makedirs(parent, exist_ok=True)
    for n in range(1, 10_000):
        path = os.path.join(parent, stamp if n == 1 else f"{stamp}-{n}")
        try:
            os.mkdir(path)
            return path
        except FileExistsError:
            continue
    raise ConfigError(f"cannot create a run directory under {parent}")


def read_json(path: str, what: str = "file") -> Any:
    from .errors import DataError

    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except FileNotFoundError:
        raise DataError(f"{what} not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{what} {path} is corrupted ({exc})") from None
