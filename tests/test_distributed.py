"""Data-parallel training under torchrun: 2 CPU processes (gloo, loopback) equal one process."""
import glob
import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from vqext.distributed import Context

# Same global batch (16) in both runs; the 2-process run computes each step's gradient as the
# all-reduced mean of two halves, so only floating-point summation order differs.
VAL_LOSS_RTOL = 1e-5
ARGS = ["run", "--arch", "mhvqlnmlp", "--pe", "rope", "--heads", "2", "--vocab-size", "16", "--d-model", "8",
        "--time-steps", "8", "--epochs", "3", "--batch-size", "16", "--data", "synthetic:sine:150", "--quiet",
        "--device", "cpu", "--no-cache"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env():
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    return env


def _history(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        return [json.loads(line) for line in fh]


@pytest.mark.parametrize("world,n", [(2, 7), (3, 7), (4, 3), (2, 1)])
def test_split_batch_covers_the_global_batch_and_weights_average_to_its_mean(world, n):
    batch = torch.arange(n)
    parts = [Context(rank=r, world_size=world).split_batch(batch) for r in range(world)]
    real = [p for p, w in parts if w > 0]
    assert torch.equal(torch.cat(real), batch)  # disjoint, in order, complete
    # DDP averages gradients over ranks, so window i of rank r counts w_r / (world * n_r) in the
    # step's gradient: that must be 1/n, as in one process's mean over the global batch.
    for p, w in parts:
        if w > 0:
            assert w / (world * len(p)) == pytest.approx(1 / n)
    assert all(len(p) >= 1 for p, _ in parts)  # an idle rank still joins the all-reduce


def test_single_process_context_is_a_no_op():
    ctx = Context()
    batch = torch.arange(5)
    part, weight = ctx.split_batch(batch)
    assert part is batch and weight == 1.0
    assert ctx.weighted_mean(0.1, 3) == 0.1 and ctx.broadcast("x") == "x" and ctx.broadcast_call(lambda: 4) == 4


def test_torchrun_two_cpu_processes_match_one_process(tmp_path):
    one = subprocess.run([sys.executable, "-m", "vqext", *ARGS, "--out", str(tmp_path / "one")],
                         capture_output=True, text=True, env=_env(), timeout=300)
    assert one.returncode == 0, one.stderr
    for attempt in range(3):  # the free port can be taken by another process before torchrun binds it
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
                    "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "-m", "vqext"]
        two = subprocess.run([*launcher, *ARGS, "--out", str(tmp_path / f"two{attempt}")],
                             capture_output=True, text=True, env=_env(), timeout=300)
        if two.returncode == 0 or "address already in use" not in (two.stdout + two.stderr).lower():
            break
    assert two.returncode == 0, two.stdout + two.stderr
    # Rank 0 alone reports and writes: one summary, one run directory.
    assert two.stdout.count("run directory:") == 1, two.stdout
    assert "Traceback" not in two.stderr
    (run_one,) = glob.glob(str(tmp_path / "one" / "*" / "*"))
    (run_two,) = glob.glob(str(tmp_path / f"two{attempt}" / "*" / "*"))
    h1, h2 = _history(run_one), _history(run_two)
    assert len(h1) == len(h2) == 3
    for a, b in zip(h1, h2):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=VAL_LOSS_RTOL)
        assert b["val_loss"] == pytest.approx(a["val_loss"], rel=VAL_LOSS_RTOL)
    m1 = json.load(open(os.path.join(run_one, "metrics.json")))
    m2 = json.load(open(os.path.join(run_two, "metrics.json")))
    assert m2["val_loss"] == pytest.approx(m1["val_loss"], rel=VAL_LOSS_RTOL)
    print(f"\nval loss: 1 process {m1['val_loss']!r}, 2 processes {m2['val_loss']!r}, "
          f"relative difference {abs(m2['val_loss'] - m1['val_loss']) / m1['val_loss']:.2e}")
