"""Windows over many series (vqext.windows): boundaries, splits and training-part statistics."""
import numpy as np
import pytest
import torch

from vqext.data import Series, load_series, make_windows, prepare
from vqext.errors import DataError
from vqext.windows import build, scalers_from_dict, scalers_to_dict


def panel(*lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [Series(10 * i + rng.standard_normal(n).cumsum(), f"s{i}", "test", "y") for i, n in enumerate(lengths)]


def test_one_series_random_split_is_the_seed_protocol():
    s = load_series("synthetic:trend:200")
    old = prepare(s, 16, "random", 0.2, 42)
    ws = build([s], 16, split="random", val_fraction=0.2, split_seed=42)
    assert ws.scalers["syn_trend"] == old.normalizer
    assert torch.equal(ws.starts[ws.train_idx], torch.as_tensor(old.train_idx))
    assert torch.equal(ws.starts[ws.val_idx], torch.as_tensor(old.val_idx))
    x, y, d = ws.gather(ws.train_idx)
    assert d is None
    assert torch.equal(x, old.x[old.train_idx]) and torch.equal(y, old.y[old.train_idx])


def test_windows_stay_inside_their_series_and_cover_every_series():
    data = panel(40, 25, 60)
    ws = build(data, 8, split="tail", val_size=5)
    assert set(ws.series[ws.train_idx].tolist()) == {0, 1, 2}
    x, y, _ = ws.gather(ws.train_idx)
    local = ws.local_start(ws.train_idx)
    for k in range(len(ws.train_idx)):
        i, s = int(ws.series[ws.train_idx[k]]), int(local[k])
        z = ws.scalers[f"s{i}"].encode(data[i].values)
        assert s + 8 + 1 <= len(z) - 5  # inputs and targets lie in the training part
        np.testing.assert_allclose(x[k, :, 0].numpy(), z[s:s + 8], rtol=1e-6)
        np.testing.assert_allclose(y[k, :, 0].numpy(), z[s + 1:s + 9], rtol=1e-6)


def test_tail_split_scales_with_the_training_part_only():
    v = np.concatenate([np.zeros(50), np.full(10, 100.0)]) + np.sin(np.arange(60))
    ws = build([Series(v, "a", "t", "y")], 8, split="tail", val_size=10)
    assert ws.scalers["a"].mean == pytest.approx(v[:50].mean())
    assert ws.scalers["a"].std == pytest.approx(v[:50].std())
    whole = build([Series(v, "a", "t", "y")], 8, split="tail", val_size=10, normalize="series")
    assert whole.scalers["a"].mean == pytest.approx(v.mean())  # the leak the default avoids
    # validation: one window per tail point, its last target in the tail
    local = ws.local_start(ws.val_idx)
    assert (local + 8).tolist() == list(range(50, 60))
    assert int(ws.train_points[0]) == 50


def test_direct_targets_follow_the_window():
    data = panel(50)
    ws = build(data, 8, split="tail", val_size=6, horizon=6)
    x, y, d = ws.gather(ws.val_idx)
    assert d.shape == (len(ws.val_idx), 6, 1)
    assert len(ws.val_idx) == 1 and int(ws.local_start(ws.val_idx)[0]) == 50 - 6 - 8  # the forecast origin
    z = ws.scalers["s0"].encode(data[0].values)
    np.testing.assert_allclose(d[0, :, 0].numpy(), z[-6:], rtol=1e-6)
    # training windows' direct targets end inside the training part
    last = int(ws.local_start(ws.train_idx).max())
    assert last + 8 + 6 == 44


def test_val_size_zero_trains_on_everything():
    data = panel(30)
    ws = build(data, 8, split="tail", val_size=0)
    assert len(ws.val_idx) == 0 and int(ws.train_points[0]) == 30
    assert int(ws.local_start(ws.train_idx).max()) == 30 - 9


def test_too_short_is_one_clear_error():
    with pytest.raises(DataError, match="no training windows.*--time-steps 30"):
        build(panel(20, 25), 30, split="tail", val_size=2)
    with pytest.raises(DataError, match="appears twice"):
        build([Series(np.arange(30.0), "a", "t", "y")] * 2, 4, split="tail", val_size=2)


def test_scalers_round_trip_and_table():
    ws = build(panel(30, 40), 8, split="tail", val_size=4)
    assert scalers_from_dict(scalers_to_dict(ws.scalers)) == ws.scalers
    lines = ws.scalers_table().splitlines()
    assert lines[0] == "unique_id,mean,std,train_points,points"
    uid, mean, std, tp, n = lines[2].split(",")
    assert uid == "s1" and float(mean) == ws.scalers["s1"].mean and (int(tp), int(n)) == (36, 40)
    with pytest.raises(DataError, match="invalid"):
        scalers_from_dict({"a": {"mean": 0.0, "std": 0.0}})
