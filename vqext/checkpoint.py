"""Checkpoints: what an exact resume needs, in a file that detects its own corruption.

The checkpoint holds the model and optimizer state, the number of finished epochs, the loss
history, the torch (CPU and CUDA), numpy and Python RNG states and the state of the generator that
shuffles the training windows and draws the input noise. The learning rate is a function of the
step count (epoch x steps per epoch), so it resumes exactly too. Resuming after epoch ``e``
therefore gives the same numbers as an uninterrupted run (CPU, same thread count).

File format: one ASCII header line ``VQEXT-CKPT 1 sha256=<hex> bytes=<n>`` followed by ``n`` bytes
written by ``torch.save``. The digest detects truncated or corrupted files; load with
:func:`load_checkpoint` (tensors are mapped to the CPU whatever device wrote them).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import random

import numpy as np
import torch

from . import config as C
from .errors import DataError
from .io import atomic_write_bytes, read_json

CHECKPOINT_MAGIC = b"VQEXT-CKPT 1"



def save_checkpoint(path: str, payload: dict) -> None:
    buf = io.BytesIO()
    torch.save(payload, buf)
    body = buf.getvalue()
    header = CHECKPOINT_MAGIC + f" sha256={hashlib.sha256(body).hexdigest()} bytes={len(body)}\n".encode()
    atomic_write_bytes(path, header + body)


def load_checkpoint(path: str) -> dict:
    """Read and verify a checkpoint; raises DataError naming the file if it is missing or corrupted."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except FileNotFoundError:
        raise DataError(f"checkpoint not found: {path}") from None
    head, sep, body = raw.partition(b"\n")
    fields = dict(f.split("=", 1) for f in head[len(CHECKPOINT_MAGIC):].decode("ascii", "replace").split() if "=" in f)
    if not sep or not head.startswith(CHECKPOINT_MAGIC) or "sha256" not in fields:
        raise DataError(f"checkpoint {path} is corrupted: not a vqext checkpoint (bad header)")
    if str(len(body)) != fields.get("bytes"):
        raise DataError(f"checkpoint {path} is corrupted: {len(body)} bytes of data, header says {fields.get('bytes')} (truncated?)")
    if hashlib.sha256(body).hexdigest() != fields["sha256"]:
        raise DataError(f"checkpoint {path} is corrupted: checksum mismatch")
    try:
        return torch.load(io.BytesIO(body), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means an unusable file
        raise DataError(f"checkpoint {path} is corrupted: {exc}") from None


def rng_state(shuffle: torch.Generator) -> dict:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "python": json.dumps(random.getstate()),
        "shuffle": shuffle.get_state(),
    }


def restore_rng(state: dict, shuffle: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    py = json.loads(state["python"])
    random.setstate((py[0], tuple(py[1]), py[2]))
    shuffle.set_state(state["shuffle"])


def remove_stale_temporaries(run_dir: str) -> None:
    """Delete temporary files that a killed writer left behind (never the files they replace)."""
    for name in os.listdir(run_dir):
        if name.startswith(".") and name.endswith(".tmp"):
            try:
                os.unlink(os.path.join(run_dir, name))
            except OSError:
                pass


def open_for_resume(run_dir: str, ckpt_path: str) -> dict | None:
    remove_stale_temporaries(run_dir)
    if not os.path.exists(ckpt_path):
        return None  # killed before the first epoch finished: start over in the same directory
    return load_checkpoint(ckpt_path)



def load_model_state(model, state: dict, path: str) -> None:
    """``model.load_state_dict`` with a mismatch reported as one DataError naming the checkpoint."""
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = next((ln.strip() for ln in str(exc).splitlines()[1:] if ln.strip()), str(exc))
        raise DataError(f"checkpoint {path} does not fit the model its config.json describes "
                        f"(written by another configuration?): {first}") from None


def kept_best(cfg, best: dict | None, epochs_done: int) -> dict | None:
    """keep_best's pick (``{"epoch", "val_loss", "model"}``) once every epoch has run; None while a
    run is unfinished or without keep_best: then the last epoch's weights stand (and resume from)."""
    if cfg.keep_best and best is not None and epochs_done >= cfg.epochs:
        return best
    return None


def forecasting_weights(cfg, ckpt: dict) -> dict:
    """The weights a run forecasts with: its best validation epoch's (:func:`kept_best`), else the last."""
    kept = kept_best(cfg, ckpt.get("best"), int(ckpt.get("epoch", 0)))
    return kept["model"] if kept is not None else ckpt["model"]


def load_run(run_dir: str):
    """(config, model on CPU in eval mode, checkpoint) of a finished or interrupted run."""
    from .train import build_model

    from .errors import ConfigError

    cfg_path = os.path.join(run_dir, C.CONFIG_FILE)
    try:
        cfg = C.RunConfig.from_dict(read_json(cfg_path, "run config"))
    except ConfigError as exc:
        raise ConfigError(f"run config {cfg_path}: {exc}") from None
    ckpt_path = os.path.join(run_dir, C.CHECKPOINT_FILE)
    ckpt = load_checkpoint(ckpt_path)
    model = build_model(cfg)
    load_model_state(model, forecasting_weights(cfg, ckpt), ckpt_path)
    model.eval()
    return cfg, model, ckpt
