"""Run configuration: what determines a run, the names of a run directory's files, and where
new run directories go."""
from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import os
import typing
from dataclasses import dataclass, field

from .errors import ConfigError

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.json"
HISTORY_FILE = "metrics.jsonl"
CHECKPOINT_FILE = "checkpoint.pt"


# ------------------------------------------------------------------------------- configuration
@dataclass
class RunConfig:
    """Everything that determines a run; stored as ``config.json`` in the run directory."""
    arch: str
    pe: str = "none"
    hparams: dict = field(default_factory=dict)        # resolved: create_model(arch, pe, **hparams)
    user_hparams: dict = field(default_factory=dict)   # what the user set explicitly
    data: str | None = None                            # CSV path (absolute), bundled:NAME, synthetic:NAME
    data_sha256: str | None = None                     # of the file's bytes (None: not a file)
    data_rows: int | None = None                       # points in the series
    column: str | None = None
    data_options: dict = field(default_factory=dict)   # load_panel's format, id_col, time_col, value_col, fill
    time_steps: int = 96
    epochs: int = 50
    lr: float = 0.007
    batch_size: int = 32
    seed: int = 0
    split: str = "random"       # "random"/"chronological": of the windows (the log); "tail": of each series
    val_fraction: float = 0.2
    split_seed: int = 42
    val_size: int | None = None  # split "tail": validation points per series (None: horizon, else val_fraction)
    normalize: str | None = None  # "train": each series' training part; "series": all of it (None: by split)
    horizon: int = 0             # the forecast horizon the run is for (0: not set)
    windows_per_epoch: int | None = None  # windows drawn per epoch (None: all; more: they repeat)
    positions: str = "window"   # "window": each window starts at position 0 (the log); "series"
    device: str = "auto"
    # Training objective and schedule (vqext/objectives.py). These defaults are the log's plain
    # training; an architecture's ``recommended_training`` replaces them where the user gives none.
    lr_schedule: str = "constant"  # or "cosine" (after a linear warmup of ``warmup`` x all steps)
    warmup: float = 0.0
    grad_clip: float = 0.0         # max gradient norm; 0 = no clipping
    input_noise: float = 0.0       # std of Gaussian noise on training inputs (normalised units)
    last_weight: float = 0.0       # loss += last_weight x MSE over the last ``last_k`` steps
    last_k: int = 16
    pushforward: int = 0           # extra passes on the model's own (detached) one-step predictions
    loss: str = "mse"              # the error every loss term measures: "mse" or "mae"
    keep_best: bool = False        # end with the epoch (0: untrained) of lowest validation loss, not the last

    def validate(self) -> None:
        if self.epochs < 1:
            raise ConfigError(f"--epochs must be at least 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be at least 1, got {self.batch_size}")
        if not self.lr > 0:
            raise ConfigError(f"--lr must be positive, got {self.lr}")
        if self.positions not in ("window", "series"):
            raise ConfigError(f"--positions must be 'window' or 'series', got {self.positions!r}")
        if self.split not in ("random", "chronological", "tail"):
            raise ConfigError(f"--split must be 'random', 'chronological' or 'tail', got {self.split!r}")
        if self.normalize not in (None, "train", "series"):
            raise ConfigError(f"--normalize must be 'train' or 'series', got {self.normalize!r}")
        if self.val_size is not None and (self.split != "tail" or self.val_size < 0):
            raise ConfigError(f"--val-size (points per series, >= 0) applies to --split tail; got {self.val_size} "
                              f"with --split {self.split}")
        if self.horizon < 0:
            raise ConfigError(f"--horizon must be >= 0, got {self.horizon}")
        if self.windows_per_epoch is not None and self.windows_per_epoch < 1:
            raise ConfigError(f"--windows-per-epoch must be at least 1, got {self.windows_per_epoch}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ConfigError(f"--device must be auto, cpu or cuda, got {self.device!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(f"--lr-schedule must be one of {', '.join(LR_SCHEDULES)}, got {self.lr_schedule!r}")
        if not 0 <= self.warmup < 1:
            raise ConfigError(f"--warmup is a fraction of all steps in [0, 1), got {self.warmup}")
        for flag, value in (("--grad-clip", self.grad_clip), ("--input-noise", self.input_noise),
                            ("--last-weight", self.last_weight)):
            if not value >= 0:
                raise ConfigError(f"{flag} must be >= 0, got {value}")
        if self.last_k < 1:
            raise ConfigError(f"--last-k must be at least 1, got {self.last_k}")
        if self.loss not in LOSSES:
            raise ConfigError(f"--loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if not isinstance(self.keep_best, bool):
            raise ConfigError(f"--keep-best is true or false, got {self.keep_best!r}")
        if self.pushforward < 0:
            raise ConfigError(f"--pushforward must be >= 0, got {self.pushforward}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ConfigError(f"config has unknown keys {sorted(unknown)} (written by a newer vqext?)")
        if "arch" not in d:
            raise ConfigError("config has no 'arch'")
        hints = typing.get_type_hints(cls)
        for key, value in d.items():
            if not _has_type(value, hints[key]):
                raise ConfigError(f"config key {key!r} should be {_type_name(hints[key])}, got {value!r}")
        return cls(**d)

    def label(self, data_label: str) -> str:
        """A directory name: architecture, encoding, every hyper-parameter that differs from the
        architecture's declared default, the series, window, learning rate, training settings that
        differ from the plain training, and the seed, e.g. ``mhvqlnmlp_rope_h8_y_w_ts96_lr0.007_s0``.
        Shortened with a hash of the whole when long (file systems allow 255 bytes)."""
        parts = [self.arch] + ([self.pe] if self.pe != "none" else [])
        parts += hparam_tags(self.arch, self.hparams, skip={"time_steps": self.time_steps})
        parts += [data_label, f"ts{self.time_steps}", f"lr{self.lr:g}"]
        parts += training_tags(self)
        parts.append(f"s{self.seed}")
        return shorten("_".join(parts))

    def identity(self) -> dict:
        """What makes runs comparable: the whole resolved configuration except the seed and the
        device, with the data named by its content where known (reports group runs by it)."""
        d = self.to_dict()
        for key in ("seed", "device", "user_hparams"):
            d.pop(key, None)
        if self.data_sha256:
            d["data"] = None  # the same bytes are the same series wherever the file lies
        return d


#: Longest label used as a directory name; longer ones keep a prefix and a hash of the whole.
MAX_LABEL = 120


def shorten(label: str, limit: int = MAX_LABEL) -> str:
    if len(label.encode("utf-8")) <= limit:
        return label
    digest = hashlib.sha256(label.encode("utf-8")).hexdigest()[:12]
    head = label.encode("utf-8")[: limit - len(digest) - 1].decode("utf-8", "ignore")
    return f"{head}-{digest}"


def _abbreviations(names) -> dict[str, str]:
    """``vocab_size`` -> ``vs``, ``heads`` -> ``h``: initials of the words; names whose initials
    clash (within one architecture) keep their full name."""
    initials = {n: "".join(w[0] for w in n.split("_") if w) or n for n in names}
    counts: dict[str, int] = {}
    for a in initials.values():
        counts[a] = counts.get(a, 0) + 1
    return {n: a if counts[a] == 1 else n for n, a in initials.items()}


def _tag_value(v) -> str:
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, float):
        return f"{v:g}"
    return "".join(c if c.isalnum() or c in ".-" else "-" for c in str(v))


def hparam_tags(arch: str, hparams: dict, skip: dict | None = None) -> list[str]:
    """Label parts for the hyper-parameters that differ from the architecture's declared defaults
    (in the architecture's order; names it does not declare come last, sorted)."""
    defaults = _arch_defaults(arch)
    skip = skip or {}
    names = list(defaults) + sorted(set(hparams) - set(defaults))
    abbrev = _abbreviations(names)
    tags = []
    for name in names:
        if name not in hparams or (name in skip and hparams[name] == skip[name]):
            continue
        if name in defaults and hparams[name] == defaults[name] and type(hparams[name]) is type(defaults[name]):
            continue
        tags.append(f"{abbrev[name]}{_tag_value(hparams[name])}")
    return tags


def _has_type(value, hint) -> bool:
    """JSON value against a field annotation (``int | None``, ``float``, ``dict`` ...)."""
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, getattr(__import__("types"), "UnionType")) else (hint,)
    for t in options:
        if t is type(None) and value is None:
            return True
        if t is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return True
        if t is int and isinstance(value, int) and not isinstance(value, bool):
            return True
        if t in (str, dict, bool) and isinstance(value, t):
            return True
    return False


def _type_name(hint) -> str:
    return " or ".join("null" if t is type(None) else t.__name__ for t in (typing.get_args(hint) or (hint,)))


LR_SCHEDULES = ("constant", "cosine")
LOSSES = ("mse", "mae")
#: Training settings the user may leave to the architecture (``recommended_training``), with
#: vqext's generic defaults (the log's training).
TRAINING_DEFAULTS = dict(epochs=50, lr=0.007, batch_size=32, lr_schedule="constant", warmup=0.0, grad_clip=0.0,
                         input_noise=0.0, last_weight=0.0, last_k=16, pushforward=0, loss="mse",
                         windows_per_epoch=None, keep_best=False)


def resolve_training(arch: str, **given) -> dict:
    """Training settings: what the user gave, else the architecture's recommendation, else vqext's default."""
    recommended = {}
    try:
        from .registry import get_arch

        recommended = dict(getattr(get_arch(arch), "recommended_training", {}) or {})
    except Exception:  # noqa: BLE001 - an unknown architecture is reported when the model is resolved
        pass
    unknown = set(given) - set(TRAINING_DEFAULTS)
    if unknown:
        raise ConfigError(f"unknown training settings {sorted(unknown)}")
    out = dict(TRAINING_DEFAULTS)
    out.update({k: v for k, v in recommended.items() if k in TRAINING_DEFAULTS})
    out.update({k: v for k, v in given.items() if v is not None})
    return out


# One branch per setting on purpose: each tag's format differs (duplicates flags them by shape).
def training_tags(cfg: "RunConfig") -> list[str]:
    """Label parts for training settings that differ from the log's plain training."""
    tags = []
    if cfg.lr_schedule != "constant":
        tags.append(f"{cfg.lr_schedule}{cfg.warmup:g}" if cfg.warmup else cfg.lr_schedule)
    if cfg.grad_clip:
        tags.append(f"clip{cfg.grad_clip:g}")
    if cfg.input_noise:
        tags.append(f"noise{cfg.input_noise:g}")
    if cfg.last_weight:
        tags.append(f"last{cfg.last_weight:g}x{cfg.last_k}")
    if cfg.pushforward:
        tags.append(f"pf{cfg.pushforward}")
    if cfg.loss != "mse":
        tags.append(cfg.loss)
    if cfg.keep_best:
        tags.append("best")
    if cfg.horizon:
        tags.append(f"h{cfg.horizon}")
    if cfg.windows_per_epoch:
        tags.append(f"wpe{cfg.windows_per_epoch}")
    return tags


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


# Like io.reserve_name's loop, but claims a directory with mkdir; the two differ in what they create.
def new_run_dir(root: str, label: str) -> str:
    """``root/label/YYYY-mm-dd-HH-MM-SS`` (``-2``, ``-3`` ... on a clash), created race-free."""
    stamp = _dt.datetime.now().strftime("%Y-%m-%d-%H-%M-%S")
    from .io import OutputError, make_dirs

    make_dirs(root, "--out")
    parent = os.path.join(root, label)
    make_dirs(parent, "run folder")
    for n in range(1, 10_000):
        path = os.path.join(parent, stamp if n == 1 else f"{stamp}-{n}")
        try:
            os.mkdir(path)
            return path
        except FileExistsError:
            continue
        except OSError as exc:
            raise OutputError(f"cannot create run directory {path}: {exc.strerror or exc}") from None
    raise ConfigError(f"cannot create a run directory under {parent}")
