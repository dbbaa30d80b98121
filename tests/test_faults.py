"""Fault injection: signals at random (seeded) points, a full disk, concurrent commands, resume from
another directory, corrupted and foreign run files. After each fault every file on disk is whole
(JSON parses, checkpoints verify, PNGs and CSVs are complete, no temporaries) and nothing written
before the fault is lost or altered."""
import errno
import glob
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest

from vqext import config as C

from _runs import TINY, assert_files_whole, assert_unchanged, invoke, run_dirs, snapshot, train_tiny, write_series

RNG = random.Random(20241223)  # the random points at which signals arrive
# Long enough that a signal lands in training: ~200 batches of 4 windows per epoch.
LONG = [*TINY[:-6], "--batch-size", "4", "--quiet", "--device", "cpu", "--no-cache", "--epochs", "3",
        "--data", "synthetic:sine:850"]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _start(*args, cwd=None):
    return subprocess.Popen([sys.executable, "-m", "vqext", *map(str, args)], cwd=cwd, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _children(pid: int) -> set[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as fh:
            return {int(p) for p in fh.read().split()}
    except OSError:
        return set()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _cli_started(pid: int) -> bool:
    """The vqext command line is running: it has installed its SIGTERM handler (SigCgt bit 15)."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            caught = next(int(ln.split()[1], 16) for ln in fh if ln.startswith("SigCgt:"))
    except (OSError, StopIteration):
        return False
    return bool(caught & (1 << (signal.SIGTERM - 1)))


def _signal_at_random_point(p, sig, low: float, high: float, watch_children=False):
    """Send ``sig`` to ``p`` alone a seeded random time after its command line started (before,
    Python's own startup is all there is to interrupt); (stdout, stderr, children seen)."""
    deadline = time.monotonic() + 600
    while not _cli_started(p.pid) and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    deadline = time.monotonic() + RNG.uniform(low, high)
    seen = set()
    while time.monotonic() < deadline and p.poll() is None:
        if watch_children:
            seen |= _children(p.pid)
        time.sleep(0.05)
    if p.poll() is None:
        p.send_signal(sig)
    out, err = p.communicate(timeout=60)
    return out, err, seen


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished tiny run, trained once; tests copy it."""
    root = tmp_path_factory.mktemp("base")
    return train_tiny(root / "runs", "synthetic:sine:60")


def _copy_run(finished_run, root) -> str:
    dst = os.path.join(str(root), *finished_run.split(os.sep)[-2:])
    shutil.copytree(finished_run, dst)
    return dst


# ----------------------------------------------------------------------------------- signals
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_to_run_leaves_whole_files(sig, tmp_path, finished_run):
    out = tmp_path / "runs"
    _copy_run(finished_run, out)
    before = snapshot(out)
    p = _start("run", *LONG, "--out", out)
    _, err, _ = _signal_at_random_point(p, sig, 0.0, 6.0)
    assert p.returncode in (0, 128 + sig, -sig), err
    assert "Traceback" not in err, err
    assert_files_whole(out)
    assert_unchanged(before, snapshot(out))
    for d in run_dirs(out):  # a started run can be resumed; one that never finished an epoch is gone
        assert os.path.exists(os.path.join(d, C.CHECKPOINT_FILE)), os.listdir(d)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_to_sweep_parent_stops_workers_and_writes_the_table(sig, tmp_path, finished_run):
    out = tmp_path / "grid"
    _copy_run(finished_run, out)
    before = snapshot(out)
    p = _start("sweep", "--archs", "mhvqlnmlp", "--pes", "none", *LONG[4:], "--seeds", "0,1,2,3", "--jobs", "2",
               "--out", out)
    t_sig = time.monotonic()
    _, err, workers = _signal_at_random_point(p, sig, 1.0, 10.0, watch_children=True)
    stopped = time.monotonic()
    assert p.returncode in (0, 128 + sig, -sig), err
    assert "Traceback" not in err, err
    deadline = time.monotonic() + 10
    while any(_alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [w for w in workers if _alive(w)], "orphaned sweep workers"
    assert stopped - t_sig < 60
    tables = glob.glob(str(out / "sweep-*.md"))
    if p.returncode and "runs finished" not in err:
        # a signal before the sweep began or after it ended: the command line's own one line
        assert ("vqext: terminated" in err or "vqext: interrupted" in err) and len(tables) <= 1, err
    elif p.returncode:
        done = int(err.split("runs finished")[0].split(":")[-1].split(" of ")[0])
        assert len(tables) == (1 if done else 0), err
    else:
        assert len(tables) == 1
    assert_files_whole(out)
    assert_unchanged(before, snapshot(out))


_WORKER_SIGTERM_IN_A_WRITE = """
import os, signal, sys
import vqext.io
from vqext import config as C, sweep

real_fsync = os.fsync
def fsync(fd):  # SIGTERM arrives while the first checkpoint's temporary is open
    if os.readlink(f"/proc/self/fd/{fd}").endswith(".tmp") and "checkpoint" in os.readlink(f"/proc/self/fd/{fd}"):
        os.kill(os.getpid(), signal.SIGTERM)
    real_fsync(fd)
vqext.io.os.fsync = fsync
sweep._worker_init(1, os.getppid())
cfg = C.RunConfig(arch="mhvqlnmlp", pe="none", data="synthetic:sine:200", time_steps=8, epochs=2,
                  batch_size=16, device="cpu", hparams={"vocab_size": 8, "d_model": 8})
sweep._run_point_in_worker(cfg.to_dict(), sys.argv[1], False)
print("the worker went on after SIGTERM")
"""


def test_sweep_worker_terminated_while_writing_a_checkpoint_leaves_no_temporary(tmp_path):
    """A sweep worker receives the parent's SIGTERM mid-write: it unwinds (temporary removed) and
    exits 143 rather than dying with a half-written file or taking the next queued run."""
    p = subprocess.run([sys.executable, "-c", _WORKER_SIGTERM_IN_A_WRITE, str(tmp_path)], env=_env(),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 128 + signal.SIGTERM, (p.stdout, p.stderr)
    assert "went on" not in p.stdout and "Traceback" not in p.stderr, p.stderr
    assert not glob.glob(str(tmp_path / "**" / "*.tmp"), recursive=True)
    assert_files_whole(tmp_path)
    assert run_dirs(tmp_path) == []  # no epoch finished: the run is removed, as after `vqext run`


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_to_forecast_leaves_whole_files(sig, tmp_path, finished_run):
    run_dir = _copy_run(finished_run, tmp_path / "runs")
    before = snapshot(tmp_path)
    p = _start("forecast", "--run", run_dir, "--data", "synthetic:sine:3000", "--origin", "start")
    _, err, _ = _signal_at_random_point(p, sig, 0.0, 3.0)
    assert p.returncode in (0, 128 + sig, -sig), err
    assert "Traceback" not in err, err
    assert_files_whole(tmp_path)
    assert_unchanged(before, snapshot(tmp_path))


# -------------------------------------------------------------------------------- full disk
def test_full_disk_at_a_random_write_loses_nothing(tmp_path, monkeypatch, finished_run):
    import vqext.io

    out = tmp_path / "runs"
    _copy_run(finished_run, out)
    before = snapshot(out)
    writes = {"n": 0, "fail_at": RNG.randint(1, 6)}
    real_fsync = os.fsync

    def fsync(fd):
        writes["n"] += 1
        if writes["n"] >= writes["fail_at"]:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(vqext.io.os, "fsync", fsync)
    r = invoke("run", *TINY, "--epochs", "2", "--data", "synthetic:sine:60", "--out", out)
    lines = [ln for ln in r.output.splitlines() if ln.startswith("vqext: error")]
    assert r.exit_code == 1 and len(lines) == 1 and "No space left on device" in lines[0], r.output
    assert str(out) in lines[0]  # names the path
    monkeypatch.undo()
    assert_files_whole(out)
    assert_unchanged(before, snapshot(out))


# ------------------------------------------------------------------------------- concurrency
def test_two_sweeps_at_once_keep_both_tables(tmp_path):
    args = ["sweep", "--archs", "mhvqlnmlp", "--pes", "none", *TINY[4:], "--epochs", "1",
            "--data", "synthetic:sine:50", "--out", tmp_path]
    procs = [_start(*args), _start(*args)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    assert len(glob.glob(str(tmp_path / "sweep-*.md"))) == 2
    assert len(glob.glob(str(tmp_path / "sweep-*.csv"))) == 2
    assert len(run_dirs(tmp_path)) == 2
    assert_files_whole(tmp_path)


def test_two_forecasts_at_once(tmp_path, finished_run):
    run_dir = _copy_run(finished_run, tmp_path / "runs")
    a, b = write_series(tmp_path / "a" / "s.csv", 50), write_series(tmp_path / "b" / "s.csv", 50, 1.0)
    before = snapshot(run_dir)
    procs = [_start("forecast", "--run", run_dir, "--data", path, "--origin", "start") for path in (a, b, a)]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        outs.append(out.strip().splitlines()[-1].removeprefix("written to "))
    assert outs[0] == outs[2] != outs[1]
    assert json.load(open(os.path.join(outs[1], C.METRICS_FILE)))["data"] == b
    assert_files_whole(tmp_path)
    assert_unchanged(before, snapshot(run_dir))


# ------------------------------------------------------------------- resume from elsewhere
def test_resume_from_another_directory_continues_on_the_runs_data(tmp_path):
    write_series(tmp_path / "s.csv", 300)
    p = _start("run", *LONG[:-2], "--data", "s.csv", "--out", "runs", cwd=tmp_path)
    deadline = time.monotonic() + 240
    while not glob.glob(str(tmp_path / "runs" / "*" / "*" / C.CHECKPOINT_FILE)) and time.monotonic() < deadline:
        time.sleep(0.1)
    p.send_signal(signal.SIGTERM)
    p.communicate(timeout=60)
    (run_dir,) = run_dirs(tmp_path / "runs")
    run_dir = os.path.abspath(run_dir)
    write_series(tmp_path / "elsewhere" / "s.csv", 300, phase=2.0)  # another file at the same relative path
    r = subprocess.run([sys.executable, "-m", "vqext", "run", "--resume", run_dir], cwd=tmp_path / "elsewhere",
                       env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    m = json.load(open(os.path.join(run_dir, C.METRICS_FILE)))
    assert m["data"] == str(tmp_path / "s.csv") and m["epochs"] == 3
    assert_files_whole(tmp_path / "runs")


# ----------------------------------------------------------------- corrupted and foreign files
@pytest.mark.parametrize("damage", ["truncated checkpoint", "garbage config", "foreign config",
                                    "checkpoint of another run", "foreign metrics"])
def test_corrupted_and_foreign_run_files_give_one_line_and_change_nothing(damage, tmp_path, finished_run):
    run_dir = _copy_run(finished_run, tmp_path / "runs")
    ckpt, cfg, met = (os.path.join(run_dir, n) for n in (C.CHECKPOINT_FILE, C.CONFIG_FILE, C.METRICS_FILE))
    if damage == "truncated checkpoint":
        data = open(ckpt, "rb").read()
        open(ckpt, "wb").write(data[: len(data) // 2])
    elif damage == "garbage config":
        open(cfg, "w").write("{not json")
    elif damage == "foreign config":
        json.dump({"model": "something else", "layers": 3}, open(cfg, "w"))
    elif damage == "checkpoint of another run":
        c = json.load(open(cfg))
        c["hparams"]["vocab_size"] = 32
        json.dump(c, open(cfg, "w"))
    else:
        json.dump([1, 2, 3], open(met, "w"))
    before = snapshot(tmp_path)
    commands = [["forecast", "--run", run_dir, "--data", "synthetic:sine:50", "--origin", "start"],
                ["run", "--resume", run_dir, "--epochs", "2"], ["report", tmp_path / "runs"]]
    metrics_ok = damage in ("truncated checkpoint", "checkpoint of another run")
    for args in commands:
        if damage == "foreign metrics" and args[0] != "report":
            continue  # forecasting and resuming do not read metrics.json
        r = invoke(*args)
        assert "Traceback" not in r.output
        if args[0] == "report":
            assert r.exit_code == 0 if metrics_ok else "note: skipping" in r.output, r.output
            continue
        errors = [ln for ln in r.output.splitlines() if ln.startswith("vqext: error")]
        assert r.exit_code == 1 and len(errors) == 1, (args, r.output)
    assert_unchanged(before, snapshot(tmp_path))
