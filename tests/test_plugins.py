"""plugins/vqext-baselines: its entries appear through entry points and train."""
import json
import os
import shutil
import subprocess
import sys
import tomllib

import pytest
import torch

import vqext
from vqext import registry
from vqext.errors import ConfigError

from _dists import activate, forget_modules, pythonpath_env, write_dist

PLUGIN_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "plugins", "vqext-baselines")


def plugin_project() -> dict:
    with open(os.path.join(PLUGIN_DIR, "pyproject.toml"), "rb") as fh:
        return tomllib.load(fh)["project"]


@pytest.fixture
def baselines(tmp_path, monkeypatch):
    """vqext-baselines as pip would leave it: its package and a dist-info with the entry points
    declared in its own pyproject.toml."""
    monkeypatch.delenv("VQEXT_DISABLE_PLUGINS", raising=False)
    project = plugin_project()
    root = write_dist(tmp_path / "site", project["name"], project["version"], project["entry-points"])
    shutil.copytree(os.path.join(PLUGIN_DIR, "vqext_baselines"), os.path.join(root, "vqext_baselines"))
    activate(monkeypatch, root)
    yield root
    registry.refresh()
    forget_modules("vqext_baselines")


def test_plugin_declares_itself_only_through_entry_points():
    project = plugin_project()
    assert any(dep.startswith("vqext") for dep in project["dependencies"])
    assert project["entry-points"]["vqext.architectures"] == {"lstm": "vqext_baselines.lstm:LSTMForecaster",
                                                              "repeat_last": "vqext_baselines.naive:RepeatLast",
                                                              "window_mean": "vqext_baselines.naive:WindowMean"}
    assert set(project["entry-points"]["vqext.positional_encodings"]) == {"learned"}


def test_entries_appear_with_their_package(baselines):
    assert "lstm" in vqext.list_archs() and "learned" in vqext.list_pes()
    assert "vqext_baselines" not in sys.modules  # listing imports nothing
    info = registry.describe()
    lstm = next(e for e in info["architectures"] if e["name"] == "lstm")
    learned = next(e for e in info["positional_encodings"] if e["name"] == "learned")
    assert (lstm["package"], lstm["version"], lstm["builtin"]) == ("vqext-baselines", "0.1.0", False)
    assert lstm["accepts"] == ["none", "sinpe", "learned"] and lstm["supports_cache"] is False
    assert learned["mode"] == "add" and learned["any_position"] is False and learned["error"] is None
    data = json.loads(subprocess.run([sys.executable, "-m", "vqext", "list", "--json"], capture_output=True,
                                     text=True, check=True, env=pythonpath_env(baselines)).stdout)
    assert "lstm" in {e["name"] for e in data["architectures"]}


def test_lstm_is_the_seed_baseline_and_trains(baselines):
    model = vqext.create_model("lstm")
    assert model.lstm.hidden_size == 64 and model.lstm.num_layers == 2
    # LSTM(1 -> 64) + LSTM(64 -> 64) + Linear(64 -> 1)
    assert sum(p.numel() for p in model.parameters()) == (4 * 64 * (1 + 64) + 8 * 64) + \
        (4 * 64 * (64 + 64) + 8 * 64) + 65
    torch.manual_seed(0)
    model = vqext.create_model("lstm", "learned", hidden_size=16, num_layers=2, time_steps=24)
    assert _train_loss_drops(model, 24)


def test_naive_baselines_are_evaluated_without_training(baselines, tmp_path):
    from vqext import config as C
    from vqext.experiment import run_experiment

    x = torch.tensor([[1.0], [3.0], [2.0], [6.0]]).unsqueeze(0)
    assert torch.equal(vqext.create_model("repeat_last")(x), x)
    assert torch.allclose(vqext.create_model("window_mean")(x).flatten(), torch.tensor([1.0, 2.0, 2.0, 3.0]))
    cfg = C.RunConfig(arch="repeat_last", hparams={"time_steps": 8}, data="synthetic:sine:60", time_steps=8,
                      epochs=1, device="cpu")
    m = run_experiment(cfg, str(tmp_path), quiet=True)
    values = vqext.data.load_series("synthetic:sine:60").values
    truth = values[8:]
    assert m["forecast"]["batch"]["mse"] == pytest.approx(float(((values[7:-1] - truth) ** 2).mean()), rel=1e-5)
    assert m["forecast"]["regressive"]["mse"] == pytest.approx(float(((values[7] - truth) ** 2).mean()), rel=1e-5)


def test_learned_encoding_works_with_builtin_archs(baselines):
    model = vqext.create_model("mhvqlnmlp", "learned", vocab_size=16, d_model=16, heads=2, time_steps=24,
                               freeze_codebook=False)
    assert model.pe.table.requires_grad
    assert _train_loss_drops(model, 24)
    assert model.pe.table.grad is not None
    with pytest.raises(vqext.errors.VqextError, match="learned positional encoding has 24 positions"):
        model(torch.randn(1, 24, 1), start_pos=1)


def test_plugin_combinations_are_validated(baselines):
    with pytest.raises(ConfigError, match=r"'lstm' does not accept the positional encoding 'rope'; it accepts: none, sinpe, learned"):
        vqext.create_model("lstm", "rope")
    with pytest.raises(ConfigError, match=r"lstm: hidden_size must be a positive integer"):
        vqext.create_model("lstm", hidden_size=0)
    with pytest.raises(ConfigError, match=r"no hyper-parameter 'hiden_size' \(did you mean 'hidden_size'\?\)"):
        vqext.create_model("lstm", hiden_size=8)


def _train_loss_drops(model, T, steps=40):
    t = torch.arange(64 + T + 1, dtype=torch.float32)
    series = torch.sin(t / 4.0)
    windows = series.unfold(0, T + 1, 1)[:64]
    x, y = windows[:, :-1, None], windows[:, 1:, None]
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y) + getattr(model, "aux_loss", 0.0)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses[-1] < 0.5 * losses[0]


@pytest.mark.slow
def test_pip_install_of_the_plugin_adds_its_entries(tmp_path):
    """The real thing: pip install the plugin into a venv layered over this environment."""
    import site
    import sysconfig

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    # Layer the new venv over this interpreter's site-packages (torch, vqext, pip, setuptools),
    # processing their .pth files too (editable installs live there).
    new_site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                              capture_output=True, text=True, check=True).stdout.strip()
    outer = [sysconfig.get_paths()["purelib"]] + site.getsitepackages()
    with open(os.path.join(new_site, "_outer_env.pth"), "w") as fh:
        fh.write("import site; " + "; ".join(f"site.addsitedir({p!r})" for p in dict.fromkeys(outer)) + "\n")
    source = tmp_path / "vqext-baselines"
    shutil.copytree(PLUGIN_DIR, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target",
                    new_site, str(source)],
                   check=True, env=dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1"))
    env = dict(os.environ)
    env.pop("VQEXT_DISABLE_PLUGINS", None)
    data = json.loads(subprocess.run([python, "-m", "vqext", "list", "--json"], capture_output=True, text=True,
                                     check=True, env=env).stdout)
    lstm = next(e for e in data["architectures"] if e["name"] == "lstm")
    assert lstm["package"] == "vqext-baselines" and lstm["error"] is None
    assert "learned" in {e["name"] for e in data["positional_encodings"]}


def test_plugin_baseline_runs_in_the_backtest(baselines):
    pytest.importorskip("statsforecast")
    import numpy as np
    import pandas as pd

    from vqext import backtest as B
    from vqext.baselines import make_baseline

    assert plugin_project()["entry-points"]["vqext.baselines"] == {"drift": "vqext_baselines.drift:drift"}
    assert "drift" in registry.list_baselines()
    y = np.array([1.0, 2.0, 4.0, 5.0, 7.0, 9.0, 10.0, 12.0])
    df = pd.DataFrame({"unique_id": "a", "ds": np.arange(8), "y": y})
    res = B.run_backtest(df, {"drift": lambda: make_baseline("drift", 1)}, horizon=2, windows=1)
    # Origin 6: last value 9 plus the mean step (9 - 1) / 5 per step ahead.
    assert np.allclose(res.forecasts.y_hat, [9 + 8 / 5, 9 + 16 / 5])
