"""Runs and results are never silently lost, overwritten, mixed up or misread (docs/reliability.md)."""
import datetime
import errno
import glob
import json
import os
import stat
import subprocess
import sys
import warnings

import pytest
import torch

from vqext import config as C
from vqext import registry
from vqext.ops import nearest_code, rope_attention
from vqext.ops.reference import nearest_code_reference

from _runs import TINY, fake_run, invoke, run_dirs, snapshot, assert_unchanged, train_tiny, write_series


def one_line_error(r, *needles):
    lines = [ln for ln in r.output.strip().splitlines() if ln.startswith("vqext: error")]
    assert r.exit_code != 0 and len(lines) == 1, r.output
    assert "Traceback" not in r.output
    for n in needles:
        assert n in lines[0], r.output
    return lines[0]


# ----------------------------------------------------------------------------------------- runs
def test_run_records_absolute_data_path_hash_and_rows(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_series("s.csv", 60)
    run_dir = train_tiny("runs", "s.csv")
    cfg = json.load(open(os.path.join(run_dir, C.CONFIG_FILE)))
    import hashlib

    assert cfg["data"] == str(tmp_path / "s.csv")
    assert cfg["data_sha256"] == hashlib.sha256((tmp_path / "s.csv").read_bytes()).hexdigest()
    assert cfg["data_rows"] == 60


@pytest.fixture
def interrupted(tmp_path, monkeypatch):
    """A run directory of a 1-epoch run whose config says 3 epochs (as if killed after epoch 1)."""
    monkeypatch.chdir(tmp_path)
    write_series("s.csv", 60)
    run_dir = os.path.abspath(train_tiny("runs", "s.csv"))
    os.unlink(os.path.join(run_dir, C.METRICS_FILE))
    path = os.path.join(run_dir, C.CONFIG_FILE)
    cfg = json.load(open(path))
    cfg["epochs"] = 3
    json.dump(cfg, open(path, "w"))
    return run_dir


def test_resume_from_another_directory_trains_on_the_runs_file(interrupted, tmp_path, monkeypatch):
    write_series(tmp_path / "elsewhere" / "s.csv", 60, phase=1.0)  # another series at the relative path
    monkeypatch.chdir(tmp_path / "elsewhere")
    r = invoke("run", "--resume", interrupted)
    assert r.exit_code == 0, r.output
    m = json.load(open(os.path.join(interrupted, C.METRICS_FILE)))
    assert m["data"] == str(tmp_path / "s.csv") and m["epochs"] == 3


def test_resume_refuses_changed_data_naming_what_changed(interrupted, tmp_path):
    before = snapshot(interrupted)
    write_series(tmp_path / "s.csv", 60, phase=0.5)
    r = invoke("run", "--resume", interrupted)
    one_line_error(r, "cannot resume", "content", "sha256")
    write_series(tmp_path / "s.csv", 70)
    one_line_error(invoke("run", "--resume", interrupted), "length (60 points then, 70 now)")
    assert_unchanged(before, snapshot(interrupted))


def test_resume_of_a_run_without_hash_checks_the_saved_normaliser(interrupted, tmp_path, monkeypatch):
    """Runs written before the hash was recorded: a relative path, checked through the normaliser."""
    path = os.path.join(interrupted, C.CONFIG_FILE)
    cfg = json.load(open(path))
    cfg.update(data="s.csv", data_sha256=None, data_rows=None)
    json.dump(cfg, open(path, "w"))
    write_series(tmp_path / "elsewhere" / "s.csv", 60, phase=1.0)
    monkeypatch.chdir(tmp_path / "elsewhere")
    before = snapshot(interrupted)
    one_line_error(invoke("run", "--resume", interrupted), "cannot resume", "mean")
    assert_unchanged(before, snapshot(interrupted))


@pytest.mark.parametrize("args,needle", [
    (["--data", "other.csv"], "--data other.csv"),
    (["--epochs", "-1"], "--epochs must be at least 1"),
    (["--epochs", "2"], "may only extend"),
    (["--lr", "0.5"], "--lr 0.5"),
    (["--time-steps", "9"], "--time-steps 9"),
    (["--d-model", "16"], "d_model=16"),
    (["--hp", "heads=4"], "heads=4"),
    (["--out", "elsewhere"], "--out"),
])
def test_resume_rejects_options_that_conflict_with_the_run(interrupted, args, needle):
    before = snapshot(interrupted)
    one_line_error(invoke("run", "--resume", interrupted, *args), needle)
    assert_unchanged(before, snapshot(interrupted))


def test_resume_accepts_matching_options_and_a_larger_epochs(interrupted, tmp_path):
    r = invoke("run", "--resume", interrupted, "--data", str(tmp_path / "s.csv"), "--lr", "0.007", "--epochs", "4",
               "--quiet")
    assert r.exit_code == 0, r.output
    assert json.load(open(os.path.join(interrupted, C.METRICS_FILE)))["epochs"] == 4
    assert json.load(open(os.path.join(interrupted, C.CONFIG_FILE)))["epochs"] == 4


def test_resume_of_a_finished_run_changes_nothing_and_says_so(tmp_path):
    run_dir = train_tiny(tmp_path / "runs", "synthetic:sine:60")
    before = snapshot(run_dir)
    r = invoke("run", "--resume", run_dir)
    assert r.exit_code == 0 and "already finished" in r.output and "nothing changed" in r.output, r.output
    assert_unchanged(before, snapshot(run_dir))
    assert set(before) == set(snapshot(run_dir))


# ------------------------------------------------------------------------------ output locations
def test_forecast_refuses_to_write_into_a_run_directory(tmp_path):
    runs = tmp_path / "runs"
    run_dir = train_tiny(runs, "synthetic:sine:60")
    other = train_tiny(runs, "synthetic:sine:60", "--seed", "1")
    before = snapshot(runs)
    for out in (run_dir, other, os.path.join(run_dir, ".")):
        one_line_error(invoke("forecast", "--origin", "start", "--run", run_dir, "--data", "synthetic:sine:50", "--out", out),
                       "is a run directory")
    assert_unchanged(before, snapshot(runs))
    assert set(before) == set(snapshot(runs))


def test_default_forecast_folders_are_unique_per_input(tmp_path):
    run_dir = train_tiny(tmp_path / "runs", "synthetic:sine:60")
    inputs = [write_series(tmp_path / "dirA" / "s.csv", 40), write_series(tmp_path / "dirB" / "s.csv", 40, 1.0),
              write_series(tmp_path / "y+w.csv", 40, 2.0), write_series(tmp_path / "y_w.csv", 40, 3.0)]
    outs = set()
    for path in inputs:
        r = invoke("forecast", "--origin", "start", "--run", run_dir, "--data", path)
        assert r.exit_code == 0, r.output
        out = r.output.strip().splitlines()[-1].removeprefix("written to ")
        assert json.load(open(os.path.join(out, C.METRICS_FILE)))["data"] == path
        outs.add(out)
    assert len(outs) == 4


def test_sweep_tables_are_unique_per_invocation(tmp_path, monkeypatch):
    class Frozen(datetime.datetime):
        @classmethod
        def now(cls, tz=None):
            return cls(2026, 1, 1, 12, 0, 0)

    monkeypatch.setattr(datetime, "datetime", Frozen)  # both sweeps start "in the same second"
    args = ["sweep", "--archs", "mhvqlnmlp", "--pes", "none", *TINY[4:], "--epochs", "1",
            "--data", "synthetic:sine:50", "--out", tmp_path]
    for _ in range(2):
        r = invoke(*args)
        assert r.exit_code == 0, r.output
    tables = sorted(os.path.basename(p) for p in glob.glob(str(tmp_path / "sweep-*.md")))
    assert tables == ["sweep-2026-01-01-12-00-00-2.md", "sweep-2026-01-01-12-00-00.md"]
    assert all(os.path.getsize(tmp_path / t) > 0 for t in tables)


def test_reserve_name_is_exclusive(tmp_path):
    from vqext.io import reserve_name

    assert [reserve_name(str(tmp_path), "t", ".md") for _ in range(3)] == ["t", "t-2", "t-3"]


# ------------------------------------------------------------------------------------- grouping
def test_labels_follow_the_architectures_defaults_and_are_shortened():
    hp = dict(registry.get_arch("mhvqlnmlp").defaults, time_steps=96, heads=8, codebook_scale=0.5)
    cfg = C.RunConfig(arch="mhvqlnmlp", pe="rope", hparams=hp, time_steps=96)
    assert cfg.label("y_w") == "mhvqlnmlp_rope_h8_cs0.5_y_w_ts96_lr0.007_s0"
    long = cfg.label("x" * 240)
    assert len(long.encode()) <= C.MAX_LABEL and long.startswith("mhvqlnmlp_rope_h8")
    assert long != C.RunConfig(arch="mhvqlnmlp", pe="rope", hparams=hp, time_steps=96).label("x" * 239)


def test_a_data_file_with_a_240_character_name_trains(tmp_path):
    path = write_series(tmp_path / ("d" * 240 + ".csv"), 60)
    run_dir = train_tiny(tmp_path / "runs", path)
    assert len(os.path.basename(os.path.dirname(run_dir))) <= C.MAX_LABEL


def _report(tmp_path, *dirs):
    from vqext.report import build_tables, find_runs

    runs, notes = find_runs([str(d) for d in dirs])
    return build_tables(runs), notes


def test_report_groups_by_the_whole_configuration(tmp_path):
    # same label, different series / hyper-parameter: never "one configuration, 2 seeds"
    fake_run(tmp_path, "a_syn_sine_s0", data="synthetic:sine:120", seed=0, val_loss=0.1)
    fake_run(tmp_path, "a_syn_sine_s1", data="synthetic:sine:600:9", seed=1, val_loss=0.9)
    fake_run(tmp_path, "b_s0", hparams={"codebook_scale": 0.5}, seed=0, stamp="x")
    fake_run(tmp_path, "b_s1", hparams={"codebook_scale": 1.0}, seed=1, stamp="x")
    fake_run(tmp_path, "c_s0", seed=0, stamp="y", lr=0.01)
    fake_run(tmp_path, "c_s1", seed=1, stamp="y", lr=0.01)
    tables, _ = _report(tmp_path, tmp_path)
    assert sorted(a["seeds"] for a in tables.aggregated) == [1, 1, 1, 1, 2]


def test_report_pivot_never_takes_minima_across_series(tmp_path):
    fake_run(tmp_path, "p1", arch="mhvqlnmlp", pe="none", data="synthetic:sine:120", val_loss=0.1)
    fake_run(tmp_path, "p2", arch="mhvqlnmlp", pe="rope", data="synthetic:sine:120", val_loss=0.2)
    fake_run(tmp_path, "p3", arch="mhvqlnmlp", pe="none", data="synthetic:trend:120", val_loss=0.7)
    fake_run(tmp_path, "p4", arch="mhvqlnmlp", pe="rope", data="synthetic:trend:120", val_loss=0.8)
    tables, _ = _report(tmp_path, tmp_path)
    md = tables.markdown
    assert "on synthetic:sine:120" in md and "on synthetic:trend:120" in md
    trend = md[md.index("Validation loss by architecture and encoding on synthetic:trend:120"):]
    assert "| MHVQLNMLP | 0.7" in trend.split("##")[0]


def test_report_shows_nan_and_inf_without_crashing(tmp_path):
    fake_run(tmp_path, "n_s0", seed=0, val_loss=float("nan"), regressive=float("inf"))
    fake_run(tmp_path, "n_s1", seed=1, val_loss=0.3, regressive=0.5, stamp="b")
    fake_run(tmp_path, "n_s2", seed=2, val_loss=0.2, regressive=0.4, stamp="c")
    r = invoke("report", tmp_path)
    assert r.exit_code == 0, r.output
    assert "nan" in r.output and "inf" in r.output
    (agg,) = [a for a in _report(tmp_path, tmp_path)[0].aggregated]
    assert agg["seeds"] == 3 and agg["worst_seed"] == 0


def test_report_skips_unreadable_and_foreign_metrics_with_one_note_each(tmp_path):
    good = fake_run(tmp_path, "good", val_loss=0.1)
    bad = fake_run(tmp_path, "bad", stamp="b")
    open(os.path.join(bad, C.METRICS_FILE), "w").write('{"val_loss": 0.1, ')
    foreign = fake_run(tmp_path, "foreign", stamp="c")
    json.dump({"accuracy": 1}, open(os.path.join(foreign, C.METRICS_FILE), "w"))
    wrongcfg = fake_run(tmp_path, "wrongcfg", stamp="d")
    json.dump({"arch": "mhvqlnmlp", "epochs": "five"}, open(os.path.join(wrongcfg, C.CONFIG_FILE), "w"))
    r = invoke("report", tmp_path)
    assert r.exit_code == 0, r.output
    notes = [ln for ln in r.output.splitlines() if ln.startswith("note: skipping")]
    assert len(notes) == 3 and all(any(d in n for n in notes) for d in (bad, foreign, wrongcfg)), r.output
    assert "good/" in r.output and good


# ------------------------------------------------------------------------------- --hp, plugins
@pytest.fixture
def baselines(tmp_path, monkeypatch):
    import shutil
    import tomllib

    from _dists import activate, forget_modules, write_dist

    monkeypatch.delenv("VQEXT_DISABLE_PLUGINS", raising=False)
    plugin = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "plugins", "vqext-baselines")
    project = tomllib.load(open(os.path.join(plugin, "pyproject.toml"), "rb"))["project"]
    root = write_dist(tmp_path / "site", project["name"], project["version"], project["entry-points"])
    shutil.copytree(os.path.join(plugin, "vqext_baselines"), os.path.join(root, "vqext_baselines"))
    activate(monkeypatch, root)
    yield root
    registry.refresh()
    forget_modules("vqext_baselines")


def test_hp_sets_a_plugin_hyper_parameter(baselines, tmp_path):
    r = invoke("run", "--arch", "lstm", "--pe", "none", "--hp", "hidden_size=6", "--hp", "num_layers=1",
               "--time-steps", "8", "--epochs", "1", "--data", "synthetic:sine:40", "--quiet", "--device", "cpu",
               "--out", tmp_path / "runs")
    assert r.exit_code == 0, r.output
    (run_dir,) = run_dirs(tmp_path / "runs")
    cfg = json.load(open(os.path.join(run_dir, C.CONFIG_FILE)))
    assert cfg["hparams"]["hidden_size"] == 6 and cfg["user_hparams"] == {"hidden_size": 6, "num_layers": 1}
    assert "_hs6_nl1_" in run_dir


def test_hp_is_validated_against_the_architecture(baselines, tmp_path):
    base = ["run", "--arch", "lstm", "--time-steps", "8", "--data", "synthetic:sine:40", "--out", tmp_path]
    one_line_error(invoke(*base, "--hp", "hiden_size=6"), "hiden_size", "did you mean 'hidden_size'")
    r = invoke(*base, "--hp", "hidden_size=big")
    assert r.exit_code != 0 and "not an integer" in r.output and "--hp" in r.output
    r = invoke(*base, "--hp", "oops")
    assert r.exit_code != 0 and "KEY=VALUE" in r.output
    assert not os.path.exists(tmp_path / "runs")


def test_sweep_hp_list_is_a_grid_axis_and_groups_apart(baselines, tmp_path):
    r = invoke("sweep", "--archs", "lstm", "--pes", "none", "--hp", "hidden_size=4,6", "--hp", "num_layers=1",
               "--time-steps", "8", "--epochs", "1", "--data", "synthetic:sine:40", "--quiet", "--device", "cpu",
               "--out", tmp_path)
    assert r.exit_code == 0, r.output
    sizes = sorted(json.load(open(os.path.join(d, C.CONFIG_FILE)))["hparams"]["hidden_size"] for d in run_dirs(tmp_path))
    assert sizes == [4, 6]
    tables, _ = _report(tmp_path, tmp_path)
    assert len(tables.aggregated) == 2


# ------------------------------------------------------------------------------------------ ops
def test_nearest_code_reference_breaks_ip_ties_to_the_smallest_index():
    gen = torch.Generator().manual_seed(3)
    for _ in range(60):
        K, D = int(torch.randint(2, 70, (1,), generator=gen)), int(torch.randint(1, 70, (1,), generator=gen))
        cb = torch.randn(K, D, generator=gen, dtype=torch.float64)
        j = int(torch.randint(1, K, (1,), generator=gen))
        cb[j] = cb[0]  # codes 0 and j tie for every query
        x = torch.cat([cb[0:1] * 3, torch.randn(40, D, generator=gen, dtype=torch.float64)])
        idx, _ = nearest_code_reference(x, cb, "ip")
        assert not bool((idx == j).any()), (K, D, j)  # code 0 wins every tie with code j
        assert torch.equal(idx, nearest_code(x, cb, "ip")[0])


def test_rope_offsets_beyond_int64_are_a_clear_error():
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(ValueError, match=r"q_offset=9223372036854775808 does not fit"):
        rope_attention(q, q, q, rope_q=True, rope_k=True, q_offset=2**63)
    with pytest.raises(ValueError, match="k_offset"):
        rope_attention(q, q, q, k_offset=-(2**63) - 1)


def test_rope_offsets_that_lose_precision_warn():
    from vqext.ops.attention import PrecisionWarning

    q = torch.randn(1, 2, 4, 8, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rope_attention(q, q, q, causal=True, rope_q=True, rope_k=True, q_offset=2**40, k_offset=2**40)
        rope_attention(q, q, q, causal=True, q_offset=2**50, k_offset=2**50)  # no rotation: exact
    with pytest.warns(PrecisionWarning, match="q_offset reaches position"):
        rope_attention(q, q, q, causal=True, rope_q=True, rope_k=True, q_offset=2**53, k_offset=2**53)
    with pytest.warns(PrecisionWarning, match="k_offset"):
        rope_attention(q, q, q, rope_k=True, k_offset=torch.tensor([2**45]))


# ------------------------------------------------------------------------ one-line messages
def test_full_disk_names_the_path_and_leaves_no_temporary(tmp_path, monkeypatch):
    import vqext.io

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(vqext.io.os, "fsync", full)
    r = invoke("run", *TINY, "--epochs", "1", "--data", "synthetic:sine:60", "--out", tmp_path / "runs")
    line = one_line_error(r, "No space left on device", "config.json")
    assert str(tmp_path) in line
    assert not [p for p in glob.glob(str(tmp_path / "**" / "*"), recursive=True) if p.endswith(".tmp")]


def test_out_dev_null_is_one_line(tmp_path):
    one_line_error(invoke("run", *TINY, "--data", "synthetic:sine:60", "--out", "/dev/null"), "/dev/null",
                   "not a directory")


@pytest.fixture
def finished(tmp_path):
    return train_tiny(tmp_path / "runs", "synthetic:sine:60")


def test_config_with_a_wrong_type_is_one_line(finished):
    path = os.path.join(finished, C.CONFIG_FILE)
    cfg = json.load(open(path))
    cfg["time_steps"] = "8"
    json.dump(cfg, open(path, "w"))
    one_line_error(invoke("forecast", "--origin", "start", "--run", finished, "--data", "synthetic:sine:50"), "time_steps", "int")
    one_line_error(invoke("run", "--resume", finished), "time_steps", "config.json")


def test_checkpoint_of_another_configuration_is_one_line(finished):
    path = os.path.join(finished, C.CONFIG_FILE)
    cfg = json.load(open(path))
    cfg["hparams"]["d_model"] = 16
    json.dump(cfg, open(path, "w"))
    one_line_error(invoke("forecast", "--origin", "start", "--run", finished, "--data", "synthetic:sine:50"),
                   "does not fit the model", "checkpoint.pt")


def test_forecast_on_a_too_short_series_does_not_advise_a_missing_option(finished):
    line = one_line_error(invoke("forecast", "--origin", "start", "--run", finished, "--data", "synthetic:sine:9"), "at least 10")
    assert "--time-steps" not in line


def test_broken_pipe_ends_quietly(tmp_path):
    for i in range(3):
        fake_run(tmp_path, f"r{i}", stamp=str(i))
    p = subprocess.Popen([sys.executable, "-m", "vqext", "report", str(tmp_path)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    p.stdout.close()  # the reader is gone before anything is written (`| head -0`)
    err = p.stderr.read().decode()
    p.wait(timeout=120)
    assert "Traceback" not in err and "BrokenPipe" not in err and "Exception ignored" not in err, err


# ------------------------------------------------------------------------------------ smaller
def test_positions_series_with_a_table_encoding_fails_before_a_run_directory(tmp_path):
    r = invoke("run", *[a if a != "none" else "randn" for a in TINY], "--positions", "series",
               "--data", "synthetic:sine:60", "--out", tmp_path / "runs")
    one_line_error(r, "randn")
    assert not os.path.exists(tmp_path / "runs") or not os.listdir(tmp_path / "runs")


def test_a_failed_start_leaves_no_empty_run_directory(tmp_path, monkeypatch):
    import vqext.experiment

    def boom(*a, **k):
        raise vqext.train.TrainingError("training loss became nan at epoch 1, batch 1")

    monkeypatch.setattr(vqext.experiment, "train", boom)
    one_line_error(invoke("run", *TINY, "--data", "synthetic:sine:60", "--out", tmp_path / "runs"), "nan")
    assert os.listdir(tmp_path / "runs") == []


@pytest.mark.parametrize("value,disabled", [("1", True), ("true", True), ("YES", True), ("0", False),
                                            ("false", False), ("no", False), ("", False)])
def test_disable_plugins_reads_true_values_only(monkeypatch, value, disabled):
    monkeypatch.setenv("VQEXT_DISABLE_PLUGINS", value)
    assert registry.plugins_disabled() is disabled


def test_forecast_of_a_partly_trained_run_says_so(finished):
    path = os.path.join(finished, C.CONFIG_FILE)
    cfg = json.load(open(path))
    cfg["epochs"] = 5
    json.dump(cfg, open(path, "w"))
    r = invoke("forecast", "--origin", "start", "--run", finished, "--data", "synthetic:sine:50")
    assert r.exit_code == 0 and "partly trained (1 of 5 epochs)" in r.output, r.output


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_files_follow_the_umask(tmp_path, umask, mode):
    from vqext.io import atomic_write_text

    old = os.umask(umask)
    try:
        atomic_write_text(str(tmp_path / "f.txt"), "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "f.txt").st_mode) == mode
