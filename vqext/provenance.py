"""Where a run's data came from, and whether a resume may continue it.

A run records its data as an absolute path (bundled and synthetic specs as given), the sha256 of
the file's bytes and the number of points. ``vqext run --resume`` checks the data it reads now
against that record and against the normaliser saved in the checkpoint, and checks the options
given with ``--resume`` against the stored configuration, so that a resumed run continues the
run it names or stops with a message saying what differs.
"""
from __future__ import annotations

import hashlib
import math
import os

from . import config as C
from .errors import ConfigError, DataError


def is_file_spec(spec: str | None) -> bool:
    return bool(spec) and not str(spec).startswith(("synthetic:", "bundled:")) and os.path.isfile(str(spec))


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def record_data(cfg: C.RunConfig, series) -> None:
    """Store the data source in ``cfg``: absolute path, content hash and point count."""
    if is_file_spec(cfg.data):
        cfg.data = os.path.abspath(cfg.data)
        cfg.data_sha256 = file_sha256(cfg.data)
    cfg.data_rows = points(series)


def points(data) -> int:
    """Points in a series, or in all series of a Panel."""
    return sum(len(s) for s in data.series) if hasattr(data, "series") else len(data)


def check_same_data(cfg: C.RunConfig, series, saved_normalizer: dict | None, normalizer) -> None:
    """Raise DataError naming what changed between the run's data and the data read now."""
    where = cfg.data or "the default data"
    changes = []
    if cfg.data_sha256 is not None:
        if not os.path.isfile(cfg.data):
            raise DataError(f"cannot resume: the run's data file {cfg.data} no longer exists")
        now = file_sha256(cfg.data)
        if now != cfg.data_sha256:
            changes.append(f"its content (sha256 {cfg.data_sha256[:12]}... then, {now[:12]}... now)")
    if cfg.data_rows is not None and cfg.data_rows != points(series):
        changes.append(f"its length ({cfg.data_rows} points then, {points(series)} now)")
    if saved_normalizer and normalizer is not None:
        for key in ("mean", "std"):
            then, now = float(saved_normalizer[key]), float(getattr(normalizer, key))
            if not math.isclose(then, now, rel_tol=1e-9, abs_tol=1e-12):
                changes.append(f"its {key} ({then:.10g} in the checkpoint, {now:.10g} now)")
    if changes:
        raise DataError(f"cannot resume: the data {where} has changed: {'; '.join(changes)}. "
                        "Start a new run for new data.")


# The option names of `vqext run` that map to a RunConfig field of the same meaning.
_FIELD_OPTIONS = {"column": "--column", "time_steps": "--time-steps", "lr": "--lr", "batch_size": "--batch-size",
                  "lr_schedule": "--lr-schedule", "warmup": "--warmup", "grad_clip": "--grad-clip",
                  "input_noise": "--input-noise", "last_weight": "--last-weight", "last_k": "--last-k",
                  "pushforward": "--pushforward", "loss": "--loss", "keep_best": "--keep-best", "split": "--split", "split_seed": "--split-seed",
                  "positions": "--positions", "arch": "--arch", "pe": "--pe", "seed": "--seed"}


def apply_resume_options(cfg: C.RunConfig, given: dict, hparams: dict, done_epochs: int) -> C.RunConfig:
    """The stored configuration, with ``--epochs N`` applied when it extends the run.

    ``given`` holds the options the user typed (name -> value); any that disagrees with the
    stored configuration is an error naming the option, as is ``--data`` naming another source.
    ``hparams`` are hyper-parameters given on the command line.
    """
    conflicts = []
    for name, value in given.items():
        if name == "epochs":
            continue
        if name == "data":
            stored = cfg.data if cfg.data_sha256 is None else os.path.realpath(cfg.data)
            typed = os.path.realpath(value) if is_file_spec(value) else value
            if typed != stored:
                conflicts.append(f"--data {value} (the run's data is {cfg.data})")
            continue
        if name not in _FIELD_OPTIONS:
            conflicts.append(f"{name} cannot be used with --resume")
            continue
        stored = getattr(cfg, name)
        if value != stored:
            conflicts.append(f"{_FIELD_OPTIONS[name]} {value} (the run has {stored})")
    for name, value in hparams.items():
        if cfg.hparams.get(name) != value:
            conflicts.append(f"{name}={value} (the run has {cfg.hparams.get(name)!r})")
    if conflicts:
        raise ConfigError("--resume continues a run with its stored configuration; conflicting options: "
                          + "; ".join(conflicts))
    if "epochs" in given:
        epochs = given["epochs"]
        if epochs < 1:
            raise ConfigError(f"--epochs must be at least 1, got {epochs}")
        if epochs < cfg.epochs:
            raise ConfigError(f"--epochs {epochs} with --resume: the run is set to {cfg.epochs} epochs "
                              f"({done_epochs} done); --epochs may only extend it")
        cfg.epochs = epochs
    return cfg


def open_resume(run_dir: str) -> tuple[C.RunConfig, int, bool]:
    """(stored configuration, finished epochs, whether the run wrote its final metrics)."""
    from .checkpoint import load_checkpoint, remove_stale_temporaries
    from .io import read_json

    cfg_path = os.path.join(run_dir, C.CONFIG_FILE)
    try:
        cfg = C.RunConfig.from_dict(read_json(cfg_path, "run config"))
    except ConfigError as exc:
        raise ConfigError(f"run config {cfg_path}: {exc}") from None
    remove_stale_temporaries(run_dir)
    ckpt_path = os.path.join(run_dir, C.CHECKPOINT_FILE)
    done = int(load_checkpoint(ckpt_path)["epoch"]) if os.path.exists(ckpt_path) else 0
    return cfg, done, os.path.exists(os.path.join(run_dir, C.METRICS_FILE))


def saved_normalizer(run_dir: str) -> dict | None:
    from .checkpoint import load_checkpoint

    path = os.path.join(run_dir, C.CHECKPOINT_FILE)
    return load_checkpoint(path).get("normalizer") if os.path.exists(path) else None


def store_extension(run_dir: str, cfg: C.RunConfig) -> None:
    """Write ``cfg`` as the run's config.json when ``--epochs`` extended it, once the checkpoint is
    known to fit the model (a failed resume leaves the run's files as they were)."""
    from .checkpoint import load_checkpoint, load_model_state
    from .io import atomic_write_json, read_json
    from .train import build_model

    path = os.path.join(run_dir, C.CONFIG_FILE)
    if read_json(path, "run config").get("epochs") == cfg.epochs:
        return
    ckpt_path = os.path.join(run_dir, C.CHECKPOINT_FILE)
    if os.path.exists(ckpt_path):
        load_model_state(build_model(cfg), load_checkpoint(ckpt_path)["model"], ckpt_path)
    atomic_write_json(path, cfg.to_dict())
