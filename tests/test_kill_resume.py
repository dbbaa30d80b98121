"""Kill -9 in the middle of an epoch, resume, and get the uninterrupted run's numbers."""
import glob
import json
import os
import signal
import subprocess
import sys
import time

from click.testing import CliRunner

from vqext import config as C
from vqext.cli import main
from vqext.checkpoint import load_checkpoint

EPOCHS = 3
# Each kill costs a process start (seconds on a busy machine); VQEXT_KILLS=2 kills in epochs 2 and 3.
KILLS = int(os.environ.get("VQEXT_KILLS", "1"))
# ~170 batches of 4 windows per epoch: an epoch lasts long enough to be killed inside it.
ARGS = ["run", "--arch", "mhvqlnmlp", "--pe", "none", "--heads", "2", "--vocab-size", "16", "--d-model", "8",
        "--time-steps", "8", "--epochs", str(EPOCHS), "--batch-size", "4", "--data", "synthetic:sine:850",
        "--quiet", "--device", "cpu", "--no-cache"]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _vqext(*args):
    return subprocess.run([sys.executable, "-m", "vqext", *args], capture_output=True, text=True, env=_env(),
                          timeout=300)


def _lines(path):
    with open(path) as fh:
        return [json.loads(line) for line in fh]


def _assert_consistent(run_dir):
    """Every file a reader can see is whole: parses, checksum verifies, agrees with the others."""
    json.load(open(os.path.join(run_dir, C.CONFIG_FILE)))
    if not os.path.exists(os.path.join(run_dir, C.CHECKPOINT_FILE)):
        assert not os.path.exists(os.path.join(run_dir, C.HISTORY_FILE))
        return 0
    ckpt = load_checkpoint(os.path.join(run_dir, C.CHECKPOINT_FILE))
    hist = _lines(os.path.join(run_dir, C.HISTORY_FILE))
    # the history is written just after the checkpoint: at most one epoch behind it
    assert ckpt["epoch"] - 1 <= len(hist) <= ckpt["epoch"]
    assert [json.loads(x) for x in ckpt["history"]][:len(hist)] == hist
    return ckpt["epoch"]


def _strip(hist):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in hist]


def test_sigkill_mid_epoch_then_resume_equals_uninterrupted(tmp_path):
    full = _vqext(*ARGS, "--out", str(tmp_path / "full"))
    assert full.returncode == 0, full.stderr
    (full_dir,) = glob.glob(str(tmp_path / "full" / "*" / "*"))

    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "vqext", *ARGS, "--out", str(out)], env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kills, run_dir, done_epochs = 0, None, 0
    deadline = time.monotonic() + 240
    while True:
        # Wait for a new epoch line, then kill about halfway through the next epoch.
        while time.monotonic() < deadline and proc.poll() is None:
            dirs = glob.glob(str(out / "*" / "*"))
            if dirs and os.path.exists(os.path.join(dirs[0], C.HISTORY_FILE)):
                run_dir = dirs[0]
                hist = _lines(os.path.join(run_dir, C.HISTORY_FILE))
                if len(hist) > done_epochs:
                    break
            time.sleep(0.02)
        assert proc.poll() is None, "the run finished before it could be killed; make the epochs longer"
        hist = _lines(os.path.join(run_dir, C.HISTORY_FILE))
        epoch_seconds = hist[-1]["seconds"] / (len(hist) - done_epochs) if len(hist) > done_epochs else 0.5
        time.sleep(epoch_seconds / 2)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        done_epochs = _assert_consistent(run_dir)
        assert 1 <= done_epochs < EPOCHS
        if done_epochs >= EPOCHS - 1:
            break
        assert not os.path.exists(os.path.join(run_dir, C.METRICS_FILE))
        if kills >= KILLS:
            break
        proc = subprocess.Popen([sys.executable, "-m", "vqext", "run", "--resume", run_dir, "--quiet", "--no-cache"],
                                env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert kills >= 1
    resumed = _vqext("run", "--resume", run_dir, "--quiet", "--no-cache")
    assert resumed.returncode == 0, resumed.stderr
    assert not [n for n in os.listdir(run_dir) if n.endswith(".tmp")]  # stale temporaries cleaned up

    a = json.load(open(os.path.join(full_dir, C.METRICS_FILE)))
    b = json.load(open(os.path.join(run_dir, C.METRICS_FILE)))
    for key in ("val_loss", "train_loss", "best_val_loss", "forecast", "codes_used", "epochs"):
        assert a[key] == b[key], key
    full_history = _lines(os.path.join(full_dir, C.HISTORY_FILE))
    assert _strip(full_history) == _strip(_lines(os.path.join(run_dir, C.HISTORY_FILE)))


def test_resume_from_a_corrupted_checkpoint_names_the_file(tmp_path):
    r = CliRunner().invoke(main, ["run", "--arch", "vqlnmlp", "--vocab-size", "16", "--d-model", "8", "-T", "8",
                                  "--epochs", "1", "--data", "synthetic:sine:60", "--quiet", "--device", "cpu",
                                  "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output
    (run_dir,) = glob.glob(str(tmp_path / "*" / "*"))
    ckpt = os.path.join(run_dir, C.CHECKPOINT_FILE)
    raw = open(ckpt, "rb").read()
    open(ckpt, "wb").write(raw[: len(raw) // 2])  # as if a non-atomic writer had been killed
    r = CliRunner().invoke(main, ["run", "--resume", run_dir, "--quiet"])
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert r.exit_code == 1 and len(lines) == 1, r.output
    assert ckpt in lines[0] and "corrupted" in lines[0] and "truncated" in lines[0]
