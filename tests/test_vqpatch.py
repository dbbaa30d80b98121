"""VQPatch: the direct-only patch codebook model, and the paths a model without one-step outputs takes."""
import dataclasses

import numpy as np
import pytest
import torch

import vqext
from vqext.data import Series
from vqext.errors import ConfigError
from vqext.forecasting import fit, make_config
from vqext.models.base import next_value
from vqext.models.vqpatch import VQPatch

from _runs import invoke

# anchor "mean" starts from random heads, so that untrained models differ from one another
SMALL = dict(time_steps=20, patch_len=5, d_model=16, heads=2, vocab_size=8, depth=1, direct_horizon=6, anchor="mean")


def model(pe="rope", **kw):
    torch.manual_seed(0)
    return vqext.create_model("vqpatch", pe, **{**SMALL, **kw})


@pytest.mark.parametrize("pe", ["none", "rope", "sinpe", "randn"])
@pytest.mark.parametrize("time_steps", [20, 23, 4])
def test_forecasts_its_horizon_for_every_encoding_and_window_length(pe, time_steps):
    m = model(pe, time_steps=time_steps)
    x = torch.randn(3, time_steps, 1)
    none, ahead = m(x, direct=True)
    assert none is None and ahead.shape == (3, 6, 1) and torch.isfinite(ahead).all()
    assert torch.equal(m.forecast_direct(x, 4), ahead[:, :4])
    assert torch.equal(next_value(m, x), ahead[:, :1])


def test_refuses_what_it_cannot_do():
    m = model()
    with pytest.raises(ValueError, match="no one-step outputs"):
        m(torch.randn(1, 20, 1))
    with pytest.raises(ValueError, match="time_steps = 20"):
        m(torch.randn(1, 21, 1), direct=True)
    with pytest.raises(ValueError, match=r"within 1..6"):
        m.forecast_direct(torch.randn(1, 20, 1), 7)
    for bad, message in [(dict(direct_horizon=0), "direct_horizon must be a positive integer"),
                         (dict(patch_len=0), "patch_len must be None \\(automatic\\) or a positive integer"),
                         (dict(instance_norm="yes"), "instance_norm must be true or false"),
                         (dict(d_model=18, heads=4), "not divisible by heads")]:
        with pytest.raises(ConfigError, match=message):
            vqext.create_model("vqpatch", "rope", **{**SMALL, **bad})


def test_instance_normalisation_makes_forecasts_follow_shifts_and_scales():
    m = model().double()
    x = torch.randn(4, 20, 1, dtype=torch.float64)
    base = m.forecast_direct(x, 6)
    moved = m.forecast_direct(3.5 * x - 7.0, 6)
    # Exact up to the variance floor, which is tiny next to these windows' spread.
    torch.testing.assert_close(moved, 3.5 * base - 7.0, rtol=1e-4, atol=1e-4)
    off = model(instance_norm=False).double()
    assert not torch.allclose(off.forecast_direct(3.5 * x - 7.0, 6), 3.5 * off.forecast_direct(x, 6) - 7.0,
                              atol=1e-3)


def test_anchored_on_the_last_value_an_untrained_model_is_the_naive_forecast():
    m = model(anchor="last")
    x = torch.randn(3, 20, 1) * 4 + 9
    assert torch.equal(m.forecast_direct(x, 6), x[:, -1:].expand(3, 6, 1))  # exactly, not within rounding
    with pytest.raises(ConfigError, match="anchor must be one of mean, last, season"):
        model(anchor="first")


@pytest.mark.parametrize("season", [1, 5, 7, 20])
def test_anchored_on_the_season_an_untrained_model_is_the_seasonal_naive_forecast(season):
    m = model(anchor="season", season=season, direct_horizon=11)
    x = torch.randn(3, 20, 1) * 4 + 9
    expected = torch.stack([x[:, 20 - season + h % season] for h in range(11)], 1)
    assert torch.equal(m.forecast_direct(x, 11), expected)
    for bad in (0, 21, True, 2.5):
        with pytest.raises(ConfigError, match="season"):
            model(anchor="season", season=bad)
    model(anchor="last", season=24)  # a season longer than the window matters only to anchor "season"


def test_a_flat_window_forecasts_its_level_without_blowing_up():
    m = model(linear_path=False)
    x = torch.full((2, 20, 1), 5.0)
    out = m.forecast_direct(x, 6)
    assert torch.isfinite(out).all() and (out - 5.0).abs().max() < 0.1


def test_every_part_gets_gradients_and_the_ablations_remove_theirs():
    m = model()
    _, ahead = m(torch.randn(8, 20, 1), direct=True)
    ahead.pow(2).mean().backward()
    grads = {n for n, p in m.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert any("quantize.codes" in n for n in grads)  # the codebook learns
    assert any(n.startswith("linear_path") for n in grads) and any(n.startswith("embed") for n in grads)
    plain = model(codebook=False, linear_path=False)
    assert plain.linear_path is None
    assert not any("quantize.codes" in n for n, _ in plain.named_parameters())
    assert not torch.allclose(plain.forecast_direct(torch.randn(2, 20, 1), 6), m.forecast_direct(torch.randn(2, 20, 1), 6))


def _panel():
    t = np.arange(200.0)
    return [Series(10 + np.sin(2 * np.pi * t / 10 + k) + 0.05 * k * t / 10, f"s{k}", "test", "y") for k in range(3)]


def test_training_scores_the_direct_head_and_is_deterministic():
    data = _panel()
    hp = {k: v for k, v in SMALL.items() if k not in ("time_steps", "direct_horizon")}
    cfg = make_config(data, arch="vqpatch", time_steps=20, horizon=6, hparams=hp, epochs=4, lr=3e-3,
                      batch_size=16, windows_per_epoch=400, device="cpu")
    a, b = fit(cfg, data), fit(cfg, data)
    losses = [r["train_loss"] for r in a.history]
    assert losses[-1] < 0.5 * losses[0]
    assert [r["val_loss"] for r in a.history] == [r["val_loss"] for r in b.history]
    # past the direct horizon the forecast feeds its own direct forecasts back
    long = a.forecast(data, 15)
    assert len(long) == 45 and np.isfinite(long.y_hat).all()
    torch.testing.assert_close(torch.tensor(long.y_hat.values), torch.tensor(b.forecast(data, 15).y_hat.values))


def test_cli_trains_it_and_refuses_a_rollout(tmp_path):
    r = invoke("run", "--arch", "vqpatch", "-T", "24", "--hp", "patch_len=6", "--hp", "d_model=16", "--epochs", "1",
               "--horizon", "6", "--rollout", "--data", "synthetic:sine:120", "--out", tmp_path, "--quiet")
    assert r.exit_code != 0 and "no one-step outputs; drop --rollout" in r.output
    r = invoke("run", "--arch", "vqpatch", "-T", "24", "--hp", "patch_len=6", "--hp", "d_model=16", "--epochs", "1",
               "--windows-per-epoch", "64", "--data", "synthetic:sine:120", "--out", tmp_path, "--quiet")
    assert r.exit_code == 0, r.output
    assert isinstance(vqext.create_model("vqpatch", "rope", direct_horizon=24), VQPatch)


@pytest.mark.parametrize("time_steps, expected", [(168, 24), (96, 24), (95, 23), (36, 9), (25, 6), (3, 1)])
def test_automatic_patches_give_short_windows_several_tokens(time_steps, expected):
    m = vqext.create_model("vqpatch", "none", time_steps=time_steps, patch_len=None, d_model=16, heads=2)
    assert m.patch_len == expected and m.patches == -(-time_steps // expected)


def test_keep_best_falls_back_to_the_naive_forecast_when_training_only_hurts_validation():
    """On a random walk the last value is the best forecast; the untrained, naive-anchored model
    (epoch 0) has the lowest validation loss, and keep_best forecasts with it."""
    walk = Series(np.cumsum(np.random.default_rng(0).normal(size=200)), "walk", "test", "y")
    hp = dict(patch_len=5, d_model=16, heads=2, vocab_size=8, depth=1)
    cfg = make_config(walk, arch="vqpatch", time_steps=20, horizon=6, hparams=hp, epochs=3, lr=3e-3,
                      batch_size=16, windows_per_epoch=400, device="cpu")
    assert cfg.keep_best  # vqpatch's recommendation
    kept = fit(cfg, walk)
    # exactly the last value (float64), through the model's float32 and the series' scaling
    assert np.array_equal(kept.forecast(walk, 6).y_hat.values, np.full(6, walk.values[-1]))
    trained = fit(dataclasses.replace(cfg, keep_best=False), walk)
    assert np.abs(trained.forecast(walk, 6).y_hat.values - walk.values[-1]).max() > 1e-3
