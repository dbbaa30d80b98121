"""`vqext backtest` end to end on the bundled airline series."""
import importlib.util
import os

import pandas as pd
import pytest
from click.testing import CliRunner

from vqext.cli import main


def invoke(*args):
    return CliRunner().invoke(main, ["backtest", *args], catch_exceptions=False)


def only_dir(root):
    (label,) = os.listdir(root)
    (stamp,) = os.listdir(os.path.join(root, label))
    return os.path.join(root, label, stamp)


def test_baselines_only_writes_tables_and_plots(tmp_path):
    pytest.importorskip("statsforecast")
    out = tmp_path / "runs"
    res = invoke("--data", "bundled:airline", "--horizon", "12", "-K", "2", "-S", "6", "-m", "12", "--no-model",
                 "--baselines", "naive,snaive", "--out", str(out), "--quiet")
    assert res.exit_code == 0, res.output
    assert "refit at each origin: naive, snaive" in res.output
    d = only_dir(out)
    assert sorted(os.listdir(d)) == ["backtest.md", "errors_by_window.png", "forecasts.csv", "forecasts.png",
                                     "per_series.csv", "per_window.csv", "summary.csv"]
    summary = pd.read_csv(os.path.join(d, "summary.csv")).set_index("model")
    assert list(summary.index) == ["naive", "snaive"]
    assert {"mae", "rmse", "mase", "smape", "owa", "seconds"} <= set(summary.columns)
    # Seasonal naive is MASE's own scale: on airline's growing seasonal pattern it beats naive.
    assert summary.loc["snaive", "mase"] < summary.loc["naive", "mase"]
    fc = pd.read_csv(os.path.join(d, "forecasts.csv"))
    assert sorted(fc.origin.unique()) == [144 - 12 - 6, 144 - 12]
    # A second invocation writes a new folder and leaves the first alone.
    invoke("--data", "bundled:airline", "--horizon", "12", "-m", "12", "--no-model", "--baselines", "naive",
           "--out", str(out), "--quiet")
    assert len(os.listdir(out / "backtest_airline")) == 2


def test_bad_settings_are_one_line_and_write_nothing(tmp_path):
    out = tmp_path / "runs"
    res = CliRunner().invoke(main, ["backtest", "--data", "bundled:nile", "--horizon", "60", "-K", "3", "--no-model",
                                    "--baselines", "none", "--out", str(out)])
    assert res.exit_code != 0
    res = CliRunner().invoke(main, ["backtest", "--data", "bundled:nile", "--horizon", "40", "-K", "3", "--no-model",
                                    "--baselines", "naive", "--out", str(out)])
    assert res.exit_code == 1
    assert "has 100 points, too short for --horizon 40 --windows 3" in res.output
    assert not out.exists()


@pytest.mark.skipif(importlib.util.find_spec("vqext.forecasting") is None, reason="needs vqext.forecasting")
def test_model_and_baselines_on_the_same_windows(tmp_path):
    pytest.importorskip("statsforecast")
    out = tmp_path / "runs"
    res = invoke("--data", "bundled:airline", "--horizon", "12", "-K", "2", "-m", "12", "--baselines", "snaive",
                 "--epochs", "1", "--windows-per-epoch", "64", "-T", "24", "--d-model", "8", "--vocab-size", "8",
                 "--out", str(out), "--quiet")
    assert res.exit_code == 0, res.output
    assert "trained once before the first origin: vqext" in res.output
    d = only_dir(out)
    fc = pd.read_csv(os.path.join(d, "forecasts.csv"))
    windows = {m: sorted(map(tuple, g[["unique_id", "origin", "step"]].values.tolist())) for m, g in fc.groupby("model")}
    assert windows["vqext"] == windows["snaive"]
    summary = pd.read_csv(os.path.join(d, "summary.csv")).set_index("model")
    assert summary.loc["vqext", "seconds"] > 0


def test_hyper_parameters_reach_the_model(tmp_path, monkeypatch):
    from vqext import backtest as B

    res = invoke("--data", "bundled:airline", "--horizon", "6", "--baselines", "none", "--hp", "no_such=1",
                 "--out", str(tmp_path), "--quiet")
    assert res.exit_code != 0 and "no_such" in res.output
    seen = []
    monkeypatch.setattr(B.VqextForecaster, "fit", lambda self, train: seen.append(self.cfg) or self)
    monkeypatch.setattr(B.VqextForecaster, "predict", lambda self, h, history=None: (_ for _ in ()).throw(
        SystemExit(0)))
    invoke("--data", "bundled:airline", "--horizon", "6", "--baselines", "none", "--arch", "vqpatch", "-T", "24",
           "--hp", "patch_len=6", "--hp", "codebook=false", "--out", str(tmp_path), "--quiet")
    assert seen[0].hparams["patch_len"] == 6 and seen[0].hparams["codebook"] is False


def test_a_pretrained_run_forecasts_unseen_series_without_training(tmp_path, monkeypatch):
    from vqext import backtest as B
    from vqext import forecasting as F

    runs = tmp_path / "runs"
    r = CliRunner().invoke(main, ["run", "--data", "synthetic:sine:300", "--arch", "vqpatch", "-T", "24",
                                  "--horizon", "6", "--hp", "d_model=16", "--epochs", "1", "--out", str(runs),
                                  "--quiet"])
    assert r.exit_code == 0, r.output
    run_dir = only_dir(runs)
    fits = []
    monkeypatch.setattr(F, "fit", lambda *a, **k: fits.append(a))
    res = invoke("--data", "bundled:airline", "--horizon", "24", "-m", "12", "--baselines", "naive",
                 "--pretrained", run_dir, "--out", str(tmp_path / "bt"), "--quiet")
    assert res.exit_code == 0, res.output
    assert not fits and "zero-shot" in res.output
    forecasts = pd.read_csv(os.path.join(only_dir(tmp_path / "bt"), "forecasts.csv"))
    assert len(forecasts[forecasts.model == "vqext"]) == 24  # 24 steps rolled from a 6-step head
    # the run's saved statistics (of a sine around 0) are never used for another series
    assert B.PretrainedForecaster.normalize == "series"
    assert forecasts[forecasts.model == "vqext"].y_hat.mean() > 200
    res = invoke("--data", "bundled:airline", "--horizon", "24", "--pretrained", run_dir, "--arch", "vqformer")
    assert res.exit_code != 0 and "--arch describe a model to train" in res.output
    res = invoke("--data", "bundled:airline", "--horizon", "24", "--pretrained", str(tmp_path))
    assert res.exit_code != 0 and "Traceback" not in res.output
