import csv
import glob
import json
import os

import pytest
from click.testing import CliRunner

from vqext.cli import main

TINY = ["--vocab-size", "16", "--d-model", "8", "--time-steps", "8", "--epochs", "2", "--batch-size", "8",
        "--data", "synthetic:sine:50", "--quiet", "--device", "cpu"]


def invoke(*args):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


@pytest.mark.parametrize("command", ["run", "sweep", "forecast", "report"])
def test_help_has_examples(command):
    r = invoke(command, "--help")
    assert r.exit_code == 0 and "Examples:" in r.output and f"vqext {command}" in r.output


def test_run_trains_forecasts_and_summarises(tmp_path):
    r = invoke("run", "--arch", "mhvqlnmlp", "--pe", "rope", "--heads", "2", *TINY, "--out", str(tmp_path))
    assert r.exit_code == 0, r.output
    assert "val loss" in r.output and "noise floor" in r.output and "run directory:" in r.output
    (run_dir,) = glob.glob(str(tmp_path / "*" / "*"))
    cfg = json.load(open(os.path.join(run_dir, "config.json")))
    assert cfg["user_hparams"] == {"vocab_size": 16, "d_model": 8, "heads": 2}
    assert cfg["hparams"]["time_steps"] == 8
    # forecasting another series with the trained model
    other = tmp_path / "other.csv"
    other.write_text("t,v\n" + "".join(f"{i},{(i % 7) * 3.0 + 100}\n" for i in range(40)))
    r = invoke("forecast", "--run", run_dir, "--data", str(other), "--horizon", "20", "--origin", "start")
    assert r.exit_code == 0, r.output
    assert "regressive" in r.output and "one-step" in r.output
    (out,) = glob.glob(os.path.join(run_dir, "forecasts", "other-*"))
    m = json.load(open(os.path.join(out, "metrics.json")))
    assert m["horizon"] == 20 and m["batch"]["points"] == 32
    assert os.path.exists(os.path.join(out, "predict_regressive.png"))
    # the future of that series: 5 rows after its 40 points
    r = invoke("forecast", "--run", run_dir, "--data", str(other), "--horizon", "5", "--out", str(tmp_path / "f"),
               "--quiet")
    assert r.exit_code == 0, r.output
    rows = (tmp_path / "f" / "forecast.csv").read_text().splitlines()
    assert rows[0] == "unique_id,step,ds,y_hat" and [r.split(",")[2] for r in rows[1:]] == ["40", "41", "42", "43", "44"]
    assert (tmp_path / "f" / "forecast.png").exists()
    r = invoke("forecast", "--run", run_dir, "--data", str(other), "--horizon", "1000000")
    assert r.exit_code == 1 and "--horizon 1000000 is more than 100 window lengths" in r.output


@pytest.mark.parametrize("args,message", [
    (["run", "--arch", "vqlnmlp", "--data", "missing.csv"], "vqext: error: data file not found: missing.csv"),
    (["run", "--arch", "nosucharch", "--data", "synthetic:sine"], "vqext: error: "),
    (["run", "--arch", "vqlnmlp", "--data", "synthetic:sine:20", "--time-steps", "19"], "too short"),
    (["run", "--arch", "vqlnmlp", "--data", "synthetic:sine", "--epochs", "0"], "--epochs must be at least 1"),
    (["sweep", "--archs", "vqlnmlp", "--shard", "3/2"], "--shard 3/2"),
    (["forecast", "--run", ".", "--data", "synthetic:sine"], "run config not found"),
    (["sweep", "--archs", "vqlnmlp,mhvqlnmlp", "--depth", "2", "--data", "synthetic:sine"], "vqext: error: "),
])
def test_errors_are_one_clear_line(args, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(main, args)
    assert r.exit_code != 0
    lines = [ln for ln in r.output.strip().splitlines() if ln]
    assert len(lines) == 1 and message in lines[0], r.output
    assert "Traceback" not in r.output
    assert not os.path.exists(tmp_path / "runs") or not os.listdir(tmp_path / "runs")  # nothing trained


def test_bad_option_values_are_usage_errors(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for args in (["sweep", "--archs", "vqlnmlp", "--heads", "x"], ["run", "--arch", "vqlnmlp", "--heads", "x"]):
        r = CliRunner().invoke(main, args)
        assert r.exit_code == 2 and "Invalid value for" in r.output and "'x' is not a valid int" in r.output
        assert "Traceback" not in r.output


def test_run_without_arch_trains_the_recommended_configuration(tmp_path):
    from vqext.models.vqformer import VQFormer

    r = invoke("run", "--d-model", "8", "--heads", "2", "--depth", "1", *TINY, "--out", str(tmp_path))
    assert r.exit_code == 0, r.output
    (run_dir,) = glob.glob(str(tmp_path / "*" / "*"))
    cfg = json.load(open(os.path.join(run_dir, "config.json")))
    assert (cfg["arch"], cfg["pe"]) == ("vqformer", "rope")
    given = {"epochs": 2, "batch_size": 8}  # TINY sets these; the rest is the recommendation
    assert {k: cfg[k] for k in VQFormer.recommended_training} == {**VQFormer.recommended_training, **given}
    assert "cosine0.05_clip1_noise0.1_last1x16_pf2" in run_dir


def test_training_flags_override_the_recommendation(tmp_path):
    r = invoke("run", "--arch", "mhvqlnmlp", "--pe", "none", "--heads", "2", *TINY, "--lr-schedule", "cosine",
               "--warmup", "0.1", "--input-noise", "0.05", "--pushforward", "1", "--out", str(tmp_path))
    assert r.exit_code == 0, r.output
    (run_dir,) = glob.glob(str(tmp_path / "*" / "*"))
    cfg = json.load(open(os.path.join(run_dir, "config.json")))
    assert (cfg["lr_schedule"], cfg["warmup"], cfg["input_noise"], cfg["pushforward"], cfg["lr"]) == \
        ("cosine", 0.1, 0.05, 1, 0.007)


def _rows(csv_path):
    with open(csv_path) as fh:
        return sorted((r["arch"], r["pe"], r["seed"], r["val_loss"]) for r in csv.DictReader(fh))


def test_sweep_shards_cover_the_grid_and_report_merges(tmp_path):
    grid = ["--archs", "mhvqlnmlp", "--pes", "none", "--heads", "2", "--seeds", "0,1,2", *TINY]
    r = invoke("sweep", *grid, "--out", str(tmp_path / "whole"))
    assert r.exit_code == 0, r.output
    assert "Across seeds" in r.output and "Median loss" in r.output
    assert "Worst regressive MSE (seed)" in r.output and "Worst / median" in r.output
    (whole_csv,) = glob.glob(str(tmp_path / "whole" / "sweep-*.csv"))
    for i in (1, 2):
        r = invoke("sweep", *grid, "--shard", f"{i}/2", "--out", str(tmp_path / f"shard{i}"))
        assert r.exit_code == 0, r.output
    r = invoke("report", str(tmp_path / "shard1"), str(tmp_path / "shard2"), "--out", str(tmp_path / "merged"))
    assert r.exit_code == 0, r.output
    assert _rows(tmp_path / "merged" / "report.csv") == _rows(whole_csv)
    assert len(_rows(whole_csv)) == 3
    assert os.path.exists(tmp_path / "merged" / "report_loss.png")
    md = open(tmp_path / "merged" / "report.md").read()
    assert "| File" in md and "Noise floor" in md and "Worst regressive MSE (seed)" in md


def test_resume_continues_an_interrupted_run(tmp_path):
    from vqext import config as C
    from vqext.train import train

    r = invoke("run", "--arch", "mhvqlnmlp", "--pe", "none", *TINY, "--out", str(tmp_path / "a"))
    (full,) = glob.glob(str(tmp_path / "a" / "*" / "*"))
    cfg = C.RunConfig.from_dict(json.load(open(os.path.join(full, "config.json"))))
    part = str(tmp_path / "b")
    os.makedirs(part)
    train(cfg, part, quiet=True, stop_after_epoch=1)
    r = invoke("run", "--resume", part, "--quiet")
    assert r.exit_code == 0, r.output
    assert json.load(open(os.path.join(part, "metrics.json")))["val_loss"] == \
        json.load(open(os.path.join(full, "metrics.json")))["val_loss"]


def test_sweep_also_adds_grids_and_runs_each_configuration_once(tmp_path):
    r = invoke("sweep", "--archs", "vqlnmlp", "--pes", "none,rope",
               "--also", "archs=mhvqlnmlp heads=2,4 pes=none", "--also", "pes=rope",  # the second repeats a run
               *TINY, "--out", str(tmp_path))
    assert r.exit_code == 0, r.output
    (csv_path,) = glob.glob(str(tmp_path / "sweep-*.csv"))
    with open(csv_path) as fh:
        rows = sorted((row["arch"], row["pe"], "heads=4" in row["hparams"]) for row in csv.DictReader(fh))
    assert rows == [("mhvqlnmlp", "none", False), ("mhvqlnmlp", "none", True),
                    ("vqlnmlp", "none", False), ("vqlnmlp", "rope", False)]


@pytest.mark.parametrize("also, message", [
    ("bogus=1", "unknown key 'bogus'"),
    ("heads", "must look like KEY=VALUE"),
    ("heads=x", "'x' is not a valid int"),
])
def test_sweep_also_rejects_bad_grids(also, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(main, ["sweep", "--archs", "vqlnmlp", "--also", also, "--data", "synthetic:sine"])
    assert r.exit_code != 0 and message in r.output, r.output
    assert not os.path.exists(tmp_path / "runs")


def test_sweep_schedules_the_longest_runs_first():
    from vqext.config import RunConfig
    from vqext.sweep import estimated_cost

    def cfg(**hp):
        return RunConfig(arch="mhvqlnmlp", pe="none", hparams={"vocab_size": 512, "d_model": 64, **hp})

    assert estimated_cost(cfg(heads=8)) > estimated_cost(cfg(heads=2)) > estimated_cost(cfg(heads=1))
    assert estimated_cost(cfg(heads=1, depth=2)) > estimated_cost(cfg(heads=1))


def test_run_with_a_horizon_and_no_arch_trains_the_recommended_forecaster(tmp_path):
    from vqext.models.vqpatch import VQPatch

    r = invoke("run", "--hp", "d_model=8", "--hp", "heads=2", "--horizon", "4", "-T", "16", "--epochs", "1",
               "--windows-per-epoch", "64", "--data", "synthetic:sine:200", "--out", str(tmp_path), "--quiet")
    assert r.exit_code == 0, r.output
    (run_dir,) = glob.glob(str(tmp_path / "*" / "*"))
    cfg = json.load(open(os.path.join(run_dir, "config.json")))
    assert (cfg["arch"], cfg["pe"], cfg["hparams"]["direct_horizon"]) == ("vqpatch", "rope", 4)
    assert cfg["loss"] == VQPatch.recommended_training["loss"] == "mae" and cfg["windows_per_epoch"] == 64
