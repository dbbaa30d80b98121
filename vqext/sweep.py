"""Sweeps: a grid of run configurations, optionally sharded, run in a pool of worker processes."""
from __future__ import annotations

import contextlib
import itertools
import os
import signal
import threading
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
class SweepStopped(BaseException):
    """SIGINT or SIGTERM reached the sweep's process (a BaseException: no ``except Exception`` in a
    run may swallow it)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signal = signal.Signals(signum)


@contextlib.contextmanager
def _signals_stop_the_sweep():
    """Turn SIGINT and SIGTERM into :class:`SweepStopped` while the sweep runs (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise SweepStopped(signum)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _worker_init(threads: int, parent: int) -> None:
    import torch

    # The parent decides when the sweep stops (a terminal's Ctrl-C reaches the whole group) ...
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # ... and a worker never outlives it, even one killed with SIGKILL (Linux).
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:
        os._exit(1)
    signal.signal(signal.SIGTERM, _worker_terminated)
    torch.set_num_threads(threads)


_RUN_IN_PROGRESS = False  # set in a worker while it trains; read by its SIGTERM handler


def _worker_terminated(signum, frame):
    """A worker's SIGTERM: unwind the run in progress (temporary files removed, like a terminated
    ``vqext run``), then exit. Dying mid-statement instead could leave a half-written temporary."""
    from .errors import Terminated

    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM (PR_SET_PDEATHSIG) must not cut the unwinding
    if not _RUN_IN_PROGRESS:
        os._exit(128 + signum)
    raise Terminated(128 + signum)


def _run_point(cfg_dict: dict, out_root: str, cache: bool) -> dict:
    from .experiment import run_experiment

    try:
        return run_experiment(C.RunConfig.from_dict(cfg_dict), out_root, quiet=True, cache=cache)
    except Exception as exc:  # noqa: BLE001 - one failed configuration must not end the sweep
        return {"error": f"{type(exc).__name__}: {exc}", "arch": cfg_dict["arch"], "pe": cfg_dict["pe"],
                "seed": cfg_dict["seed"], "hparams": cfg_dict["hparams"]}


def _run_point_in_worker(cfg_dict: dict, out_root: str, cache: bool) -> dict:
    from .errors import Terminated

    global _RUN_IN_PROGRESS
    _RUN_IN_PROGRESS = True
    try:
        return _run_point(cfg_dict, out_root, cache)
    except Terminated as stop:
        # The pool's worker loop would report a BaseException and take the next queued run.
        os._exit(stop.code)
    finally:
        _RUN_IN_PROGRESS = False


def estimated_cost(cfg: C.RunConfig) -> float:
    """A rough relative training cost, for scheduling only: the codebook attention's work per window
    (narrow heads cost extra per score), times depth, windows and epochs."""
    hp = cfg.hparams
    heads, width = int(hp.get("heads", 1) or 1), int(hp.get("d_model", 64) or 64)
    per_score = width / heads + 8.0  # head size plus the exp and bookkeeping of each score
    return cfg.epochs * cfg.time_steps * int(hp.get("vocab_size", 64) or 64) * heads * per_score * int(hp.get("depth", 1) or 1)


def run_sweep(configs: list[C.RunConfig], out_root: str, *, jobs: int = 1, quiet: bool = False,
              cache: bool = False, echo=print) -> tuple[list[dict | None], signal.Signals | None]:
    """Run every config (``jobs`` worker processes, CPU threads split between them).

    Returns the results in ``configs`` order and the signal that stopped the sweep (None when it
    ran to the end). On SIGINT or SIGTERM the workers are terminated at once; runs that had not
    finished are None in the results.
    """
    results: list[dict | None] = [None] * len(configs)
    with _signals_stop_the_sweep():
        try:
            if jobs <= 1:
                for n, cfg in enumerate(configs, 1):
                    if not quiet:
                        echo(f"[{n}/{len(configs)}] {cfg.arch} {cfg.pe} seed {cfg.seed} {cfg.user_hparams or ''}")
                    results[n - 1] = _run_point(cfg.to_dict(), out_root, cache)
            else:
                _run_pool(configs, out_root, jobs, quiet, cache, echo, results)
        except SweepStopped as stop:
            return results, stop.signal
    return results, None


def _run_pool(configs, out_root, jobs, quiet, cache, echo, results) -> None:
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    threads = max(1, (os.cpu_count() or 1) // jobs)
    ctx = mp.get_context("spawn")  # fork after torch has started its thread pools can deadlock
    # Longest first (a greedy schedule): a long run started last would leave the other workers idle.
    order = sorted(range(len(configs)), key=lambda i: -estimated_cost(configs[i]))
    pool = ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_worker_init, initargs=(threads, os.getpid()))
    try:
        futures = {pool.submit(_run_point_in_worker, configs[i].to_dict(), out_root, cache): i for i in order}
        for n, fut in enumerate(as_completed(futures), 1):
            i = futures[fut]
            results[i] = r = fut.result()
            if not quiet:
                status = r.get("error") or f"val loss {r['val_loss']:.6g}"
                echo(f"[{n}/{len(configs)}] {configs[i].arch} {configs[i].pe} seed {configs[i].seed}: {status}")
    except BaseException:
        _terminate(pool)
        raise
    pool.shutdown(wait=True)


def _terminate(pool) -> None:
    """Stop a process pool now: drop queued work and end the workers (SIGTERM, then SIGKILL)."""
    import time

    workers = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for p in workers:
        if p.is_alive():
            p.terminate()
    deadline = time.monotonic() + 5
    for p in workers:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join(1)
