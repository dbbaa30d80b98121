import os
import warnings

import numpy as np
import pytest
import torch

from vqext.data import (DataWarning, Normalizer, load_series, make_windows, noise_floor, parse_csv_text, prepare,
                        split_indices)
from vqext.errors import DataError


def test_bundled_datasets_are_the_published_numbers():
    air = load_series("bundled:airline")
    assert len(air) == 144 and air.values.sum() == 40363 and air.values[0] == 112 and air.values[-1] == 432
    nile = load_series("nile")
    assert len(nile) == 100 and nile.values.sum() == 91935 and nile.values.min() == 456
    assert load_series(None).source == "bundled:airline"  # the default


def test_csv_header_optional_and_column_choice(tmp_path):
    p = tmp_path / "s.csv"
    p.write_text("time,temp,label\n0,1.5,a\n1,2.5,b\n2,3.5,c\n")
    s = load_series(str(p))  # default: the last numeric column
    assert s.column == "temp" and s.values.tolist() == [1.5, 2.5, 3.5] and s.name == "s"
    assert load_series(str(p), "time").values.tolist() == [0, 1, 2]
    assert load_series(str(p), 0).values.tolist() == [0, 1, 2]
    v, col = parse_csv_text("1,10\n2,20\n3,30\n")
    assert col == "1" and v.tolist() == [10, 20, 30]
    v, _ = parse_csv_text("1,10\n2,20\n", column=-2)
    assert v.tolist() == [1, 2]


@pytest.mark.parametrize("text,column,message", [
    ("", None, "empty"),
    ("a,b\n", None, "only a header"),
    ("a,b\n1,2\n3,x\n", "b", "'x' is not a number"),
    ("a,b\n1,2\n3,nan\n", "b", "NaN/inf"),
    ("a,b\n1,2\n3,inf\n", "b", "NaN/inf"),
    ("a,b\n1,2\n", "c", "no column 'c'"),
    ("a,b\n1,2\n", 5, "out of range"),
    ("a,b\nx,y\n", None, "no column holds numbers \\(last column: line 2, column .b.: .y. is not a number\\)"),
    ("a,b\n1,2\n3\n", "b", "line 3 has no value"),
])
def test_csv_errors_are_clear(text, column, message):
    with pytest.raises(DataError, match=message):
        parse_csv_text(text, column, source="f.csv")


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_series(str(tmp_path / "nope.csv"))
    with pytest.raises(DataError, match="directory"):
        load_series(str(tmp_path))
    with pytest.raises(DataError, match="unknown bundled"):
        load_series("bundled:nope")
    with pytest.raises(DataError, match="unknown synthetic"):
        load_series("synthetic:nope")


def test_synthetic_series_are_seeded():
    a, b = load_series("synthetic:sine:50"), load_series("synthetic:sine:50")
    assert len(a) == 50 and np.array_equal(a.values, b.values)
    assert not np.array_equal(load_series("synthetic:random-walk:50:1").values,
                              load_series("synthetic:random-walk:50:2").values)


def test_windows_targets_are_inputs_shifted_by_one():
    v = np.arange(10.0)
    x, y = make_windows(v, 4)
    assert x.shape == y.shape == (6, 4, 1)
    assert x[2, :, 0].tolist() == [2, 3, 4, 5] and y[2, :, 0].tolist() == [3, 4, 5, 6]
    assert y[-1, -1, 0] == 9
    make_windows(np.arange(6.0), 4)  # T + 2 points: two windows, fine
    with pytest.raises(DataError, match="too short.*needs at least 6"):
        make_windows(np.arange(5.0), 4)


def test_random_split_matches_torch_random_split():
    tr, va = split_indices(637, 0.2, "random", 42)
    ref = torch.utils.data.random_split(range(637), [0.8, 0.2], generator=torch.Generator().manual_seed(42))
    assert tr == list(ref[0].indices) and va == list(ref[1].indices)
    assert len(tr) == 510 and len(va) == 127 and not set(tr) & set(va)
    tr, va = split_indices(10, 0.2, "chronological")
    assert tr == list(range(8)) and va == [8, 9]


def test_normalisation_uses_the_series_statistics():
    s = load_series("synthetic:trend:80")
    ds = prepare(s, 8)
    assert abs(ds.normalizer.mean - s.values.mean()) < 1e-12
    z = ds.normalizer.encode(s.values)
    assert abs(z.mean()) < 1e-9 and abs(z.std() - 1) < 1e-9
    assert np.allclose(ds.normalizer.decode(z), s.values)
    with pytest.warns(DataWarning, match="constant"):
        assert Normalizer.fit(np.full(5, 2.0)).std == 1.0  # constant series: no division by zero


def test_noise_floor_of_white_noise_is_its_variance():
    rng = np.random.default_rng(0)
    v = 0.01 * np.arange(2000) + rng.standard_normal(2000)
    nf = noise_floor(v)
    assert 0.9 < nf["variance"] < 1.1 and nf["window"] == 32 and nf["method"] == "ar"


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_noise_floor_of_a_noisy_sine_is_the_noise_variance(seed):
    # The old centred moving average (20 points here) smeared the sine itself into the "noise":
    # it reported ~0.33 for noise of variance 0.0025.
    rng = np.random.default_rng(seed)
    t = np.arange(400)
    v = np.sin(2 * np.pi * t / 25) + 0.05 * rng.standard_normal(400)
    assert abs(noise_floor(v)["variance"] / 0.0025 - 1) < 0.3
    assert abs(noise_floor(load_series("synthetic:sine").values)["variance"] / 0.0025 - 1) < 0.3


def test_noise_floor_of_a_random_walk_is_its_step_variance():
    rng = np.random.default_rng(3)
    v = np.cumsum(2.0 * rng.standard_normal(1000))
    assert abs(noise_floor(v)["variance"] / 4.0 - 1) < 0.2
    assert np.isnan(noise_floor(np.arange(8.0))["variance"])  # too short to estimate


@pytest.mark.parametrize("name", ["y+w.csv", "w+y.csv"])
def test_noise_floor_of_the_seed_series_sits_between_difference_estimates(name):
    path = f"/work/shared/data/{name}"
    if not os.path.exists(path):
        pytest.skip("seed data not present")
    v = load_series(path).values
    floor = noise_floor(v)["variance"]
    # white-noise estimates from first and second differences bracket it within 25 %
    lo, hi = np.var(np.diff(v, 2)) / 6, np.var(np.diff(v)) / 2
    assert 0.75 * min(lo, hi) < floor < 1.25 * max(lo, hi)


def test_tiny_spread_is_normalised_with_its_true_std_and_a_warning():
    rng = np.random.default_rng(0)
    v = 1e-300 * rng.standard_normal(50)
    with pytest.warns(DataWarning, match=r"tiny spread \(std 9\.\d+e-301\): squared errors underflow"):
        norm = Normalizer.fit(v, "tiny.csv")
    assert norm.std == pytest.approx(np.std(v / 1e-300) * 1e-300, rel=1e-12)  # not the constant-series 1.0
    assert abs(np.std(norm.encode(v)) - 1) < 1e-9


def test_relative_tiny_spread_and_constant_series_warn():
    with pytest.warns(DataWarning, match=r"s\.csv varies by std 1e-08 around a mean of 1e\+06"):
        Normalizer.fit(1e6 + 1e-8 * np.array([1.0, -1.0, 1.0, -1.0]), "s.csv")
    with pytest.warns(DataWarning, match="is constant"):
        assert Normalizer.fit(np.full(5, 2.0)).std == 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an ordinary series: not a word
        Normalizer.fit(load_series("bundled:airline").values)
