"""Forecasting the future (vqext.forecasting): rows after the end, training statistics, direct heads."""
import json
import os

import numpy as np
import pandas as pd
import pytest
import torch

import vqext
from vqext.config import RunConfig
from vqext.data import Normalizer, Series
from vqext.errors import ConfigError
from vqext.forecasting import Fitted, forecast, future_ds, roll
from vqext.models.base import ForecastModel


class Zero(ForecastModel):
    """Predicts 0 in normalised units: its forecast in original units is the scaler's mean."""
    def forward(self, x, start_pos=0):
        return torch.zeros_like(x)


class LastPlus(ForecastModel):
    """Next value = last value + 1 (normalised), so a rollout climbs by one per step."""
    def forward(self, x, start_pos=0):
        return x + 1.0


def fitted(model, T=4, scalers=None, positions="window"):
    return Fitted(model, RunConfig(arch="vqformer", pe="none", time_steps=T, positions=positions), scalers or {})


def series(uid, values, ds=None):
    s = Series(np.asarray(values, dtype=np.float64), uid, "test", "y")
    object.__setattr__(s, "uid", uid)
    object.__setattr__(s, "ds", ds)
    return s


def test_rows_start_after_the_end_of_each_series():
    a = series("a", np.arange(10.0))
    b = series("b", np.arange(7.0), ds=np.arange("2024-01-01", "2024-01-08", dtype="datetime64[D]"))
    out = forecast(fitted(LastPlus()), [a, b], 3, normalize="series")
    assert list(out.columns) == ["unique_id", "step", "ds", "y_hat"]
    fa, fb = out[out.unique_id == "a"], out[out.unique_id == "b"]
    assert fa.step.tolist() == [1, 2, 3] and fa.ds.tolist() == [10, 11, 12]
    assert list(pd.to_datetime(fb.ds)) == list(pd.date_range("2024-01-08", periods=3, freq="D"))
    # the rollout continues from the last point: +1 normalised unit per step
    sa = Normalizer.fit(np.arange(10.0))
    np.testing.assert_allclose(fa.y_hat, sa.decode(sa.encode(9.0) + np.arange(1, 4)))


def test_future_timestamps_follow_the_spacing():
    assert future_ds(np.array([3, 5, 7]), 3, 2).tolist() == [9, 11]
    assert future_ds(None, 5, 2).tolist() == [5, 6]
    hours = np.arange("2024-01-01T00", "2024-01-01T05", dtype="datetime64[h]")
    assert list(future_ds(hours, 5, 2)) == list(np.array(["2024-01-01T05", "2024-01-01T06"], dtype="datetime64[ns]"))


def test_training_statistics_not_the_future():
    # The level jumps in the last points: the whole series' mean differs from the training part's.
    v = np.r_[np.sin(np.arange(20.0)), np.full(5, 50.0)]
    train_stats = Normalizer.fit(v[:20])
    run = fitted(Zero(), scalers={"a": train_stats})
    got = forecast(run, [series("a", v)], 2)                      # default: the run's statistics
    np.testing.assert_allclose(got.y_hat, train_stats.mean)
    own = forecast(run, [series("a", v)], 2, normalize="series")  # the series' history instead
    np.testing.assert_allclose(own.y_hat, v.mean())
    unseen = forecast(run, [series("b", v)], 2)                   # a series the run never saw
    np.testing.assert_allclose(unseen.y_hat, v.mean())


def test_origin_start_is_the_seed_protocol():
    v = np.arange(12.0)
    out = forecast(fitted(LastPlus()), [series("a", v)], 5, origin="start")
    assert out.ds.tolist() == [4, 5, 6, 7, 8]
    s = Normalizer.fit(v)
    np.testing.assert_allclose(out.y_hat, s.decode(s.encode(3.0) + np.arange(1, 6)))


def test_short_history_is_padded_with_its_first_value():
    out = forecast(fitted(LastPlus(), T=8), [series("a", [1.0, 2.0, 4.0])], 2, normalize="series")
    s = Normalizer.fit(np.array([1.0, 2.0, 4.0]))
    np.testing.assert_allclose(out.y_hat, s.decode(s.encode(4.0) + np.arange(1, 3)))
    assert out.ds.tolist() == [3, 4]


def test_horizon_limits():
    with pytest.raises(ConfigError, match="--horizon 1000000 is more than 100 window lengths"):
        forecast(fitted(Zero()), [series("a", np.arange(10.0))], 1_000_000)
    with pytest.raises(ConfigError, match="positive integer"):
        forecast(fitted(Zero()), [series("a", np.arange(10.0))], 0)
    with pytest.raises(ConfigError, match="no direct head"):
        forecast(fitted(Zero()), [series("a", np.arange(10.0))], 2, method="direct")


def tiny_vqformer(T=12, H=0, **kw):
    torch.manual_seed(0)
    return vqext.create_model("vqformer", "rope", vocab_size=16, d_model=8, heads=2, depth=1, time_steps=T,
                              direct_horizon=H, **kw)


def test_direct_head_shapes_and_registry():
    m = tiny_vqformer(H=5)
    x = torch.randn(3, 12, 1)
    y, ahead = m(x, direct=True)
    assert y.shape == (3, 12, 1) and ahead.shape == (3, 5, 1)
    assert torch.equal(y, m(x))  # the one-step outputs are the same with or without the head
    assert torch.equal(m.forecast_direct(x, 3), ahead[:, :3])
    with pytest.raises(ValueError, match="within 1..5"):
        m.forecast_direct(x, 6)
    assert tiny_vqformer().direct_horizon == 0 and m.direct_horizon == 5
    info = {a["name"]: a for a in vqext.registry.describe()["architectures"]}
    assert info["vqformer"]["supports_direct"] and not info["vqlnmlp"]["supports_direct"]
    with pytest.raises(ConfigError, match="direct_horizon"):
        vqext.create_model("vqformer", "rope", direct_horizon=-1)


def test_direct_forecast_chains_past_the_head():
    m = tiny_vqformer(H=4).eval()
    ctx = np.random.default_rng(0).standard_normal((2, 12))
    ten = roll(m, ctx, 10, method="direct")
    with torch.no_grad():
        first = m.forecast_direct(torch.as_tensor(ctx, dtype=torch.float32).unsqueeze(-1), 4)[..., 0].numpy()
    np.testing.assert_allclose(ten[:, :4], first, rtol=1e-6)
    # rollout and the cached rollout agree (depth 1, rope: the cache is exact)
    a = roll(m, ctx, 6, method="rollout", cache=False, arch="vqformer", pe="rope")
    b = roll(m, ctx, 6, method="rollout", cache=True, arch="vqformer", pe="rope")
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_rollout_equals_the_single_series_regressive_forecast():
    from vqext.forecast import regressive

    m = tiny_vqformer().eval()
    v = np.random.default_rng(1).standard_normal(30)
    ref = regressive(m, v, 12, horizon=7)
    got = roll(m, v[None, :12], 7, method="rollout", cache=False)
    np.testing.assert_allclose(got[0], ref, rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------- global training, fit
from vqext import windows as W  # noqa: E402
from vqext.forecasting import fit, load, make_config  # noqa: E402

TINY = dict(vocab_size=16, d_model=8, heads=2, depth=1)


def three_series():
    rng = np.random.default_rng(0)
    return [series(f"s{i}", 100 * i + 10 * np.sin(np.arange(n) / 3) + rng.standard_normal(n))
            for i, n in enumerate((40, 55, 70))]


def test_fit_draws_windows_from_every_series_and_bounds_epochs(tmp_path, monkeypatch):
    seen = []
    gather = W.WindowSet.gather

    def spy(self, ids):
        seen.append(self.series[ids])
        return gather(self, ids)

    monkeypatch.setattr(W.WindowSet, "gather", spy)
    data = three_series()
    cfg = make_config(data, time_steps=8, horizon=4, hparams=TINY, epochs=2, batch_size=8, windows_per_epoch=24,
                      device="cpu")
    assert cfg.split == "tail" and cfg.hparams["direct_horizon"] == 4
    f = fit(cfg, data, str(tmp_path))
    assert [r["windows"] for r in f.history] == [24, 24]  # not the 120 training windows there are
    drawn = torch.cat(seen[:6])  # the training batches of the first epoch (3 of 8 per epoch)
    assert set(drawn.tolist()) == {0, 1, 2}
    # validation: one window per series, at its forecast origin (the tail = the horizon)
    assert len(f.history) == 2 and all(np.isfinite(r["val_loss"]) for r in f.history)


def test_saved_scalers_are_the_training_parts_and_round_trip(tmp_path):
    data = three_series()
    cfg = make_config(data, time_steps=8, horizon=5, hparams=TINY, epochs=1, windows_per_epoch=64, device="cpu")
    f = fit(cfg, data, str(tmp_path))
    for s in data:
        assert f.scalers[s.uid].mean == pytest.approx(s.values[:-5].mean())
        assert f.scalers[s.uid].mean != pytest.approx(s.values.mean())
    again = load(str(tmp_path))
    assert again.scalers == f.scalers
    table = pd.read_csv(tmp_path / "scalers.csv", float_precision="round_trip")
    assert table.unique_id.tolist() == ["s0", "s1", "s2"] and table["mean"].tolist() == [
        f.scalers[u].mean for u in ("s0", "s1", "s2")]
    # forecasts from the loaded run equal the fitted object's
    a = f.forecast(data, 7)
    b = vqext.forecast(str(tmp_path), data, 7)
    pd.testing.assert_frame_equal(a, b)
    assert (a.groupby("unique_id").ds.min() == pd.Series({"s0": 40, "s1": 55, "s2": 70})).all()


def test_fit_without_a_run_directory_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = make_config("synthetic:sine:80", time_steps=8, horizon=3, hparams=TINY, epochs=1, windows_per_epoch=64,
                      device="cpu")
    f = fit(cfg, "synthetic:sine:80")
    assert os.listdir(tmp_path) == [] and f.run_dir is None
    assert len(f.forecast("synthetic:sine:80", 3)) == 3


def test_direct_head_trains():
    data = "synthetic:sine:300"
    cfg = make_config(data, time_steps=16, horizon=8, hparams=TINY, epochs=5, windows_per_epoch=128, device="cpu",
                      lr=0.01)
    torch.manual_seed(0)
    init = tiny_vqformer(T=16, H=8).eval()
    f = fit(cfg, data)
    ws = W.build(vqext.forecasting.as_panel(data), 16, split="tail", val_size=8, horizon=8)
    x, _, ahead = ws.gather(ws.train_idx)
    with torch.no_grad():
        before = float(((init.forecast_direct(x, 8) - ahead) ** 2).mean())
        after = float(((f.model.forecast_direct(x, 8) - ahead) ** 2).mean())
    assert after < 0.7 * before, (before, after)  # measured: 1.76 -> 0.92
    direct = f.forecast(data, 8)
    rollout = f.forecast(data, 8, method="rollout")
    assert not np.allclose(direct.y_hat, rollout.y_hat)


def test_cli_trains_globally_and_forecasts_every_series(tmp_path):
    from click.testing import CliRunner

    from vqext.cli import main

    rng = np.random.default_rng(0)
    rows = ["unique_id,ds,y"]
    ends = {}
    for uid, n, start in (("a", 40, "2024-01-01 00:00"), ("b", 52, "2024-03-01 05:00"), ("c", 33, "2024-02-10 12:00")):
        stamps = pd.date_range(start, periods=n, freq="h")
        ends[uid] = stamps[-1]
        rows += [f"{uid},{t:%Y-%m-%d %H:%M:%S},{10 * ord(uid) + np.sin(i / 2) + 0.1 * rng.standard_normal():.6f}"
                 for i, t in enumerate(stamps)]
    data = tmp_path / "long.csv"
    data.write_text("\n".join(rows) + "\n")
    r = CliRunner().invoke(main, ["run", "--data", str(data), "-T", "8", "--horizon", "4", "--epochs", "1",
                                  "--windows-per-epoch", "16", "--vocab-size", "8", "--d-model", "8", "--heads", "2",
                                  "--depth", "1", "--device", "cpu", "--quiet", "--out", str(tmp_path / "runs")])
    assert r.exit_code == 0, r.output
    run_dir = r.output.strip().splitlines()[-1].split("run directory: ")[1]
    cfg = json.load(open(os.path.join(run_dir, "config.json")))
    assert cfg["split"] == "tail" and cfg["hparams"]["direct_horizon"] == 4
    assert pd.read_csv(os.path.join(run_dir, "scalers.csv")).unique_id.tolist() == ["a", "b", "c"]
    assert os.path.exists(os.path.join(run_dir, "forecast.png"))  # the run forecasts its horizon
    r = CliRunner().invoke(main, ["forecast", "--run", run_dir, "--data", str(data), "--horizon", "6", "--quiet",
                                  "--out", str(tmp_path / "f")])
    assert r.exit_code == 0, r.output
    out = pd.read_csv(tmp_path / "f" / "forecast.csv", parse_dates=["ds"])
    assert len(out) == 18 and list(out.columns) == ["unique_id", "step", "ds", "y_hat"]
    for uid, f in out.groupby("unique_id"):
        assert list(f.ds) == list(pd.date_range(ends[uid] + pd.Timedelta(hours=1), periods=6, freq="h"))
        assert f.step.tolist() == [1, 2, 3, 4, 5, 6]
    assert (tmp_path / "f" / "forecast.png").exists()
    summary = json.load(open(tmp_path / "f" / "metrics.json"))
    assert summary["series_with_saved_statistics"] == 3 and summary["method"] == "direct"
