import numpy as np
import pytest
import torch

from vqext.data import load_series
from vqext.forecast import cache_usable, error_metrics, forecast_series, one_step, regressive
from vqext.registry import create_model


def tiny(arch, pe, **kw):
    torch.manual_seed(0)
    hp = {"vqformer": dict(vocab_size=16, d_model=16, heads=2, depth=1, time_steps=12),
          "mhvqlnmlp": dict(vocab_size=16, d_model=8, heads=2, time_steps=12)}[arch]
    hp.update(kw)
    return create_model(arch, pe, **hp).eval()


@pytest.mark.parametrize("pe", ["rope", "none"])
def test_cached_regressive_equals_recomputation_one_layer(pe):
    model = tiny("vqformer", pe)
    z = np.sin(np.arange(60) / 4.0)
    ok, why = cache_usable("vqformer", pe)
    assert ok, why
    recomputed = regressive(model, z, 12, horizon=40, cache=False)
    cached = regressive(model, z, 12, horizon=40, cache=True)
    assert cached.shape == recomputed.shape == (40,)
    # Relative to the forecast's scale: float32 rotations at positions 0..T-1 (recomputed windows)
    # and at absolute positions (cache) round differently in the last bits.
    rel = np.abs(cached - recomputed).max() / np.abs(recomputed).max()
    assert rel <= 1e-5, rel


@pytest.mark.parametrize("pe", ["randn", "sinpe"])
def test_absolute_encodings_say_so_and_recompute(pe):
    ok, why = cache_usable("vqformer", pe)
    assert not ok and "absolute" in why
    model = tiny("vqformer", pe)
    values = load_series("synthetic:sine:40").values
    with pytest.warns(UserWarning, match="absolute"):
        fc = forecast_series(model, "vqformer", pe, values, 12, cache=True)
    assert not fc.metrics["cache"]
    ref = forecast_series(model, "vqformer", pe, values, 12, cache=False)
    np.testing.assert_array_equal(fc.regressive, ref.regressive)


def test_forecasts_in_original_units_and_horizons():
    model = tiny("mhvqlnmlp", "rope")
    values = 1000 + 50 * load_series("synthetic:sine:50").values
    fc = forecast_series(model, "mhvqlnmlp", "rope", values, 12)
    assert fc.one_step.shape == (38,) and fc.regressive.shape == (38,)
    assert fc.metrics["batch"]["points"] == 38 and 800 < fc.one_step.mean() < 1200
    longer = forecast_series(model, "mhvqlnmlp", "rope", values, 12, horizon=60)
    assert longer.regressive.shape == (60,) and longer.metrics["regressive"]["points"] == 38
    np.testing.assert_allclose(longer.regressive[:38], fc.regressive, rtol=1e-6)


def test_one_step_matches_the_model_on_each_window():
    model = tiny("mhvqlnmlp", "none")
    z = np.cos(np.arange(30) / 3.0)
    pred = one_step(model, z, 12)
    x = torch.tensor(z[5:17], dtype=torch.float32).view(1, 12, 1)
    with torch.no_grad():
        assert abs(pred[5] - float(model(x)[0, -1, 0])) < 1e-6


def test_first_regressive_step_is_the_one_step_forecast():
    model = tiny("vqformer", "rope")
    z = np.sin(np.arange(40) / 5.0)
    assert abs(regressive(model, z, 12, horizon=1)[0] - one_step(model, z, 12)[0]) < 1e-6


def test_error_metrics():
    m = error_metrics(np.array([1.0, 2.0, 3.0]), np.array([2.0, 2.0, 1.0, 9.0]))
    assert m == {"mse": 5 / 3, "mae": 1.0, "points": 3}


real_registry = pytest.mark.skipif(
    (__import__("vqext.registry").registry.__doc__ or "").startswith("LOCAL DEVELOPMENT STUB"),
    reason="needs the real model registry")


@real_registry
def test_seed_model_with_rope_recomputes_in_window_positions():
    model = tiny("mhvqlnmlp", "rope")
    values = load_series("synthetic:sine:40").values
    with pytest.warns(UserWarning, match="absolute positions"):
        fc = forecast_series(model, "mhvqlnmlp", "rope", values, 12, cache=True)
    assert not fc.metrics["cache"]
    # with series positions the cache is exact, and used
    fc = forecast_series(model, "mhvqlnmlp", "rope", values, 12, cache="auto", positions="series")
    ref = forecast_series(model, "mhvqlnmlp", "rope", values, 12, cache=False, positions="series")
    assert fc.metrics["cache"]
    assert np.abs(fc.regressive - ref.regressive).max() <= 1e-5 * np.abs(ref.regressive).max()


@real_registry
def test_deeper_models_use_the_cache_only_when_asked():
    model = tiny("vqformer", "rope", depth=2)
    values = load_series("synthetic:sine:40").values
    assert not forecast_series(model, "vqformer", "rope", values, 12, cache="auto").metrics["cache"]
    with pytest.warns(UserWarning, match="depth 2"):
        assert forecast_series(model, "vqformer", "rope", values, 12, cache=True).metrics["cache"]
