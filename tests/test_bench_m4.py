"""benchmarks/bench_m4.py on a tiny fake M4 file (validation and test modes)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("statsforecast")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks", "bench_m4.py")


def write_m4(path, rows):
    """The published M4 layout: a quoted V1..Vn header, quoted id and values, shorter rows padded
    with empty (unquoted) cells."""
    width = 1 + max(len(v) for v in rows.values())
    lines = [",".join(f'"V{i + 1}"' for i in range(width))]
    for uid, values in rows.items():
        lines.append(",".join([f'"{uid}"'] + [f'"{float(v)!r}"' for v in values] + [""] * (width - 1 - len(values))))
    path.write_text("\n".join(lines) + "\n")


def series(n, phase):
    t = np.arange(n)
    return 100 + 20 * np.sin(2 * np.pi * (t + phase) / 24) + 0.1 * t


def run(*args):
    proc = subprocess.run([sys.executable, BENCH, *args, "--quiet"], capture_output=True, text=True, cwd=ROOT,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_validation_mode_holds_out_the_last_horizon(tmp_path):
    full = {"H1": series(130, 0), "H2": series(110, 5), "H3": series(150, 11)}
    train = tmp_path / "Hourly-train.csv"
    write_m4(train, full)
    out = tmp_path / "res.json"
    text = run("--train", str(train), "--no-model", "--baselines", "naive,snaive", "--json", str(out))
    assert "3 series, horizon 48, season 24, validation" in text
    res = json.loads(out.read_text())
    assert set(res["models"]) == {"naive", "snaive"}
    # A 24-periodic signal plus a trend of 0.1 a point: seasonal naive repeats the last day, so it is
    # 2.4 low on the first 24 held-out points and 4.8 low on the next 24; the MASE scale is 2.4.
    snaive = res["models"]["snaive"]
    err = np.r_[np.full(24, 2.4), np.full(24, 4.8)]
    expected = np.mean([np.mean(200 * err / (np.abs(v[-48:]) + np.abs(v[-48:] - err))) for v in full.values()])
    assert snaive["smape"] == pytest.approx(expected)
    assert snaive["mase"] == pytest.approx(1.5)
    assert res["models"]["naive"]["owa"] > snaive["owa"]
    assert all(set(m) == {"smape", "mase", "owa", "seconds", "cpu_seconds"} for m in res["models"].values())


def test_test_mode_scores_the_test_file(tmp_path):
    # A synthetic two-series file named like M4's test part, written here: it exercises --test's
    # scoring path only. No official M4 test file is read; tuning uses the validation split.
    full = {"H1": series(130, 0), "H2": series(110, 5)}
    train, test = tmp_path / "Hourly-train.csv", tmp_path / "Hourly-test.csv"
    write_m4(train, {u: v[:-48] for u, v in full.items()})
    write_m4(test, {u: v[-48:] for u, v in full.items()})
    out = tmp_path / "res.json"
    run("--train", str(train), "--test", str(test), "--no-model", "--baselines", "snaive", "--json", str(out))
    # The same numbers as validation mode on the full series: the same origins, the same truth.
    write_m4(tmp_path / "Hourly-full.csv", full)
    out2 = tmp_path / "res2.json"
    run("--train", str(tmp_path / "Hourly-full.csv"), "--no-model", "--baselines", "snaive", "--json", str(out2))
    a, b = json.loads(out.read_text()), json.loads(out2.read_text())
    assert a["models"]["snaive"]["smape"] == pytest.approx(b["models"]["snaive"]["smape"])
    assert a["models"]["snaive"]["mase"] == pytest.approx(b["models"]["snaive"]["mase"])
    assert a["mode"].startswith("test")


def test_test_file_with_a_wrong_horizon_is_one_clear_line(tmp_path):
    full = {"H1": series(130, 0)}
    train, test = tmp_path / "Hourly-train.csv", tmp_path / "Hourly-test.csv"
    write_m4(train, {u: v[:-48] for u, v in full.items()})
    write_m4(test, {u: v[-40:] for u, v in full.items()})
    proc = subprocess.run([sys.executable, BENCH, "--train", str(train), "--test", str(test), "--no-model",
                           "--baselines", "naive"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode != 0
    assert "H1 has 40 test values, expected the horizon 48" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_the_frequency_recipe_fills_only_what_the_model_args_leave_open():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import bench_m4
    finally:
        sys.path.pop(0)
    recipe = "-T 168 --hp anchor=season --hp season=168"
    assert bench_m4.with_recipe("Hourly", "") == recipe
    assert bench_m4.with_recipe("Hourly", "--epochs 5") == recipe + " --epochs 5"
    assert bench_m4.with_recipe("Hourly", "-T 200") == "--hp anchor=season --hp season=168 -T 200"
    assert bench_m4.with_recipe("Hourly", "--hp anchor=last") == "-T 168 --hp season=168 --hp anchor=last"
    assert bench_m4.with_recipe("Hourly", "--arch vqformer") == "--arch vqformer"  # the recipe is vqpatch's
    assert bench_m4.with_recipe("Weekly", "--epochs 2") == "--epochs 2"  # no recipe: the defaults
