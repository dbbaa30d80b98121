"""Helpers for tests about run directories: tiny training options, fake finished runs, file hashes."""
from __future__ import annotations

import csv
import glob
import hashlib
import json
import os

import numpy as np
from click.testing import CliRunner

from vqext import config as C
from vqext.cli import main

# Seconds per run on a busy 2-core machine: 1 epoch over ~40 windows of a width-8 model.
TINY = ["--arch", "mhvqlnmlp", "--pe", "none", "--vocab-size", "8", "--d-model", "8", "--time-steps", "8",
        "--batch-size", "16", "--quiet", "--device", "cpu", "--no-cache"]


def invoke(*args, **kw):
    return CliRunner().invoke(main, [str(a) for a in args], **kw)


def write_series(path, n: int = 60, phase: float = 0.0) -> str:
    path = str(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    v = np.sin(np.arange(n) / 4.0 + phase) + 0.1 * np.cos(np.arange(n) / 1.7)
    with open(path, "w") as fh:
        fh.write("y\n" + "".join(f"{x:.6f}\n" for x in v))
    return path


def run_dirs(root) -> list[str]:
    return sorted(d for d in glob.glob(os.path.join(str(root), "*", "*")) if os.path.isdir(d)
                  and os.path.exists(os.path.join(d, C.CONFIG_FILE)))


def train_tiny(out, data, *extra) -> str:
    """Train a 1-epoch tiny run into ``out``; returns its run directory."""
    before = set(run_dirs(out))
    r = invoke("run", *TINY, "--epochs", "1", "--data", data, "--out", out, *extra)
    assert r.exit_code == 0, r.output
    (run_dir,) = set(run_dirs(out)) - before
    return run_dir


def snapshot(root) -> dict[str, str]:
    """sha256 of every file under ``root`` (path -> digest)."""
    out = {}
    for dirpath, _, files in os.walk(str(root)):
        for name in files:
            p = os.path.join(dirpath, name)
            with open(p, "rb") as fh:
                out[p] = hashlib.sha256(fh.read()).hexdigest()
    return out


def assert_unchanged(before: dict, after: dict) -> None:
    """Nothing already written is lost or altered (new files may appear)."""
    lost = sorted(set(before) - set(after))
    changed = sorted(p for p in before if p in after and before[p] != after[p])
    assert not lost and not changed, f"lost {lost}, changed {changed}"


def assert_files_whole(root) -> int:
    """Every file under ``root`` is complete: JSON parses, checkpoints verify, PNGs have the PNG
    signature and an IEND chunk, CSVs parse with one width; no temporary file is left. Returns the count."""
    from vqext.checkpoint import load_checkpoint

    n = 0
    for dirpath, _, files in os.walk(str(root)):
        for name in files:
            p = os.path.join(dirpath, name)
            n += 1
            assert not name.endswith(".tmp"), f"temporary file left: {p}"
            if name.endswith(".json"):
                with open(p) as fh:
                    json.load(fh)
            elif name.endswith(".jsonl"):
                with open(p) as fh:
                    for line in fh:
                        json.loads(line)
            elif name.endswith(".pt"):
                load_checkpoint(p)
            elif name.endswith(".png"):
                with open(p, "rb") as fh:
                    data = fh.read()
                assert data.startswith(b"\x89PNG\r\n\x1a\n") and data.rstrip(b"\x00").endswith(b"IEND\xaeB`\x82"), p
            elif name.endswith(".csv"):
                with open(p, newline="") as fh:
                    rows = list(csv.reader(fh))
                assert rows and len({len(r) for r in rows}) == 1, p
    return n


def fake_run(root, label: str, *, seed=0, data="synthetic:sine:60", val_loss=0.5, regressive=1.0,
             hparams=None, arch="mhvqlnmlp", pe="none", stamp="2026-01-01-00-00-00", **cfg_kw) -> str:
    """A finished run directory written directly (config.json + metrics.json), for report tests."""
    run_dir = os.path.join(str(root), label, stamp)
    os.makedirs(run_dir)
    hp = {"vocab_size": 8, "d_model": 8, "heads": 2, "time_steps": 8, **(hparams or {})}
    cfg = C.RunConfig(arch=arch, pe=pe, hparams=hp, data=data, time_steps=8, epochs=1, seed=seed, **cfg_kw)
    with open(os.path.join(run_dir, C.CONFIG_FILE), "w") as fh:
        json.dump(cfg.to_dict(), fh)
    metrics = {"run": run_dir, "arch": arch, "pe": pe, "hparams": hp, "seed": seed, "data": data,
               "val_loss": val_loss, "best_val_loss": val_loss, "train_seconds": 1.0,
               "forecast": {"batch": {"mse": regressive / 2, "mae": 0.1}, "regressive": {"mse": regressive, "mae": 0.2}},
               "noise_floor": {"window": 3, "variance": 0.01}}
    with open(os.path.join(run_dir, C.METRICS_FILE), "w") as fh:
        fh.write(json.dumps(metrics, allow_nan=True))
    return run_dir
