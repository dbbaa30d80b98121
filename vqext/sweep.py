"""Sweeps: a grid of run configurations, optionally sharded, run in a pool of worker processes."""
from __future__ import annotations

import itertools
import os
from dataclasses import dataclass

from . import config as C
from .errors import ConfigError


# ----------------------------------------------------------------------------------- the grid
@dataclass(frozen=True)
class GridPoint:
    arch: str
    pe: str
    hparams: tuple  # sorted (name, value) pairs the user set
    seed: int

    @property
    def user_hparams(self) -> dict:
        return dict(self.hparams)


def build_grid(archs, pes, hparam_lists: dict, seeds) -> list[GridPoint]:
    """Cartesian product in a fixed order (archs, pes, hparams in name order, seeds)."""
    names = sorted(hparam_lists)
    grid = []
    for arch, pe, *vals in itertools.product(archs, pes, *(hparam_lists[n] for n in names)):
        for seed in seeds:
            grid.append(GridPoint(arch, pe, tuple(zip(names, vals[:len(names)])), int(seed)))
    return grid


def parse_shard(text: str | None) -> tuple[int, int]:
    """``"I/N"`` -> (I, N), 1 <= I <= N. ``None`` -> (1, 1)."""
    if not text:
        return 1, 1
    try:
        i, n = (int(p) for p in text.split("/"))
    except ValueError:
        raise ConfigError(f"--shard must look like I/N (e.g. 2/4), got {text!r}") from None
    if n < 1 or not 1 <= i <= n:
        raise ConfigError(f"--shard {text}: need 1 <= I <= N (shards are numbered from 1)")
    return i, n


def shard(grid: list, index: int, count: int) -> list:
    """The index-th (1-based) of ``count`` disjoint slices; together they cover the grid."""
    return grid[index - 1::count]


# ------------------------------------------------------------------------------ sweep running
def _worker_init(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def _run_point(cfg_dict: dict, out_root: str, cache: bool) -> dict:
    from .experiment import run_experiment

    try:
        return run_experiment(C.RunConfig.from_dict(cfg_dict), out_root, quiet=True, cache=cache)
    except Exception as exc:  # noqa: BLE001 - one failed configuration must not end the sweep
        return {"error": f"{type(exc).__name__}: {exc}", "arch": cfg_dict["arch"], "pe": cfg_dict["pe"],
                "seed": cfg_dict["seed"], "hparams": cfg_dict["hparams"]}


def estimated_cost(cfg: C.RunConfig) -> float:
    """A rough relative training cost, for scheduling only: the codebook attention's work per window
    (narrow heads cost extra per score), times depth, windows and epochs."""
    hp = cfg.hparams
    heads, width = int(hp.get("heads", 1) or 1), int(hp.get("d_model", 64) or 64)
    per_score = width / heads + 8.0  # head size plus the exp and bookkeeping of each score
    return cfg.epochs * cfg.time_steps * int(hp.get("vocab_size", 64) or 64) * heads * per_score * int(hp.get("depth", 1) or 1)


def run_sweep(configs: list[C.RunConfig], out_root: str, *, jobs: int = 1, quiet: bool = False,
              cache: bool = False, echo=print) -> list[dict]:
    """Run every config (``jobs`` worker processes, CPU threads split between them)."""
    results = []
    if jobs <= 1:
        for n, cfg in enumerate(configs, 1):
            if not quiet:
                echo(f"[{n}/{len(configs)}] {cfg.arch} {cfg.pe} seed {cfg.seed} {cfg.user_hparams or ''}")
            results.append(_run_point(cfg.to_dict(), out_root, cache))
        return results
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    threads = max(1, (os.cpu_count() or 1) // jobs)
    ctx = mp.get_context("spawn")  # fork after torch has started its thread pools can deadlock
    # Longest first (a greedy schedule): a long run started last would leave the other workers idle.
    order = sorted(range(len(configs)), key=lambda i: -estimated_cost(configs[i]))
    with ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_worker_init, initargs=(threads,)) as pool:
        futures = {pool.submit(_run_point, configs[i].to_dict(), out_root, cache): i for i in order}
        done: dict[int, dict] = {}
        for n, fut in enumerate(as_completed(futures), 1):
            i = futures[fut]
            done[i] = fut.result()
            if not quiet:
                r = done[i]
                status = r.get("error") or f"val loss {r['val_loss']:.6g}"
                echo(f"[{n}/{len(configs)}] {configs[i].arch} {configs[i].pe} seed {configs[i].seed}: {status}")
    return [done[i] for i in range(len(configs))]
