import dataclasses
import json
import os

import pytest
import torch

from vqext import config as C
from vqext.errors import DataError
from vqext.registry import resolve_hparams
from vqext.checkpoint import load_checkpoint, load_run
from vqext.experiment import run_experiment
from vqext.io import atomic_write_json
from vqext.train import SCALERS_FILE, TrainingError, train

TINY = {"vqlnmlp": dict(vocab_size=16, d_model=8),
        "mhvqlnmlp": dict(vocab_size=16, d_model=8, heads=2),
        "vqformer": dict(vocab_size=16, d_model=8, heads=2, depth=1)}


def tiny_config(arch="mhvqlnmlp", pe="rope", epochs=3, data="synthetic:sine:60", T=8, **kw):
    hp = resolve_hparams(arch, pe, time_steps=T, **TINY[arch])
    return C.RunConfig(arch=arch, pe=pe, hparams=hp, user_hparams=TINY[arch], data=data, time_steps=T,
                       epochs=epochs, lr=0.01, batch_size=8, seed=kw.pop("seed", 0), device="cpu", **kw)


def history(run_dir):
    with open(os.path.join(run_dir, C.HISTORY_FILE)) as fh:
        return [json.loads(line) for line in fh]


def strip_time(hist):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in hist]


def test_same_seed_same_numbers_on_cpu(tmp_path):
    a = train(tiny_config(), str(tmp_path / "a"), quiet=True)
    b = train(tiny_config(), str(tmp_path / "b"), quiet=True)
    assert strip_time(a.history) == strip_time(b.history)
    c = train(tiny_config(seed=1), str(tmp_path / "c"), quiet=True)
    assert strip_time(c.history) != strip_time(a.history)
    assert strip_time(history(str(tmp_path / "a"))) == strip_time(a.history)


def test_resume_equals_uninterrupted(tmp_path):
    full = train(tiny_config(epochs=4), str(tmp_path / "full"), quiet=True)
    part_dir = str(tmp_path / "part")
    train(tiny_config(epochs=4), part_dir, quiet=True, stop_after_epoch=2)
    assert load_checkpoint(os.path.join(part_dir, C.CHECKPOINT_FILE))["epoch"] == 2
    # The process "dies" here; its RNG state is lost. A fresh process resumes.
    torch.manual_seed(12345)
    resumed = train(tiny_config(epochs=4), part_dir, quiet=True, resume=True)
    assert strip_time(resumed.history) == strip_time(full.history)
    for k, v in full.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k


def test_no_temporary_files_left(tmp_path):
    train(tiny_config(epochs=2), str(tmp_path), quiet=True)
    assert sorted(os.listdir(tmp_path)) == [C.CHECKPOINT_FILE, C.CONFIG_FILE, C.HISTORY_FILE, SCALERS_FILE]
    # a writer killed mid-write leaves only its hidden temporary; resume cleans it up
    (tmp_path / ".checkpoint.pt.abc123.tmp").write_bytes(b"half a checkpo")
    train(tiny_config(epochs=3), str(tmp_path), quiet=True, resume=True)
    assert sorted(os.listdir(tmp_path)) == [C.CHECKPOINT_FILE, C.CONFIG_FILE, C.HISTORY_FILE, SCALERS_FILE]


def test_atomic_write_replaces_whole_files(tmp_path):
    path = str(tmp_path / "f.json")
    atomic_write_json(path, {"a": 1})
    atomic_write_json(path, {"a": 2})
    assert json.load(open(path)) == {"a": 2} and os.listdir(tmp_path) == ["f.json"]


def test_resume_before_the_first_checkpoint_starts_over(tmp_path):
    full = train(tiny_config(epochs=2), str(tmp_path / "a"), quiet=True)
    os.makedirs(tmp_path / "b")
    again = train(tiny_config(epochs=2), str(tmp_path / "b"), quiet=True, resume=True)
    assert strip_time(again.history) == strip_time(full.history)


@pytest.mark.parametrize("damage", ["truncate", "flip", "header", "empty"])
def test_corrupted_checkpoint_is_detected_and_named(tmp_path, damage):
    train(tiny_config(epochs=1), str(tmp_path), quiet=True)
    path = os.path.join(tmp_path, C.CHECKPOINT_FILE)
    raw = open(path, "rb").read()
    if damage == "truncate":
        raw = raw[: len(raw) // 2]
    elif damage == "flip":
        i = len(raw) - 100
        raw = raw[:i] + bytes([raw[i] ^ 0xFF]) + raw[i + 1:]
    elif damage == "header":
        raw = b"garbage" + raw
    else:
        raw = b""
    open(path, "wb").write(raw)
    with pytest.raises(DataError, match=f"checkpoint {path} is corrupted"):
        load_checkpoint(path)
    with pytest.raises(DataError, match="corrupted"):
        train(tiny_config(epochs=2), str(tmp_path), quiet=True, resume=True)


def test_checkpoint_loads_on_cpu_and_rebuilds_the_model(tmp_path):
    res = train(tiny_config(epochs=1), str(tmp_path), quiet=True)
    cfg, model, ckpt = load_run(str(tmp_path))
    assert all(t.device.type == "cpu" for t in ckpt["model"].values())
    x = torch.randn(2, 8, 1)
    res.model.eval()
    assert torch.equal(model(x), res.model(x))


def test_nan_loss_stops_with_a_clear_message(tmp_path, monkeypatch):
    import vqext.train as T

    real = T.build_model

    def poisoned(cfg):
        model = real(cfg)
        model.register_forward_hook(lambda m, args, out: out * float("nan"))
        return model

    monkeypatch.setattr(T, "build_model", poisoned)
    with pytest.raises(TrainingError, match="loss became nan at epoch 1, batch 1; lower --lr"):
        train(tiny_config(), str(tmp_path), quiet=True)


def test_run_experiment_writes_a_complete_run_dir(tmp_path):
    m = run_experiment(tiny_config(epochs=2), str(tmp_path), quiet=True)
    files = set(os.listdir(m["run"]))
    assert {"config.json", "metrics.json", "metrics.jsonl", "checkpoint.pt", "forecast.csv", "predict_batch.png",
            "predict_regressive.png", "loss.png", "codebook_usage.png"} <= files
    assert not [f for f in files if f.endswith(".tmp")]
    assert m["forecast"]["regressive"]["points"] == 60 - 8 and m["forecast"]["batch"]["points"] == 52
    assert m["val_loss"] > 0 and m["noise_floor"]["variance"] > 0
    saved = json.load(open(os.path.join(m["run"], "metrics.json")))
    assert saved["val_loss"] == m["val_loss"]
    cfg = json.load(open(os.path.join(m["run"], "config.json")))
    assert cfg["hparams"]["vocab_size"] == 16 and cfg["arch"] == "mhvqlnmlp"
    assert os.path.basename(os.path.dirname(m["run"])).startswith("mhvqlnmlp_rope_vs16_dm8_syn_sine_ts8_lr0.01_s0")


# ------------------------------------------------------------- objectives and the recommendation
RECOMMENDED_OBJECTIVE = dict(lr_schedule="cosine", warmup=0.2, grad_clip=1.0, input_noise=0.1, last_weight=1.0,
                             last_k=4, pushforward=1)


def test_resume_is_exact_with_noise_schedule_and_pushforward(tmp_path):
    cfg = lambda: tiny_config(arch="vqformer", epochs=4, **RECOMMENDED_OBJECTIVE)  # noqa: E731
    full = train(cfg(), str(tmp_path / "full"), quiet=True)
    part_dir = str(tmp_path / "part")
    train(cfg(), part_dir, quiet=True, stop_after_epoch=2)
    torch.manual_seed(999)  # the resuming process starts with other RNG states
    resumed = train(cfg(), part_dir, quiet=True, resume=True)
    assert strip_time(resumed.history) == strip_time(full.history)
    plain = train(tiny_config(arch="vqformer", epochs=4), str(tmp_path / "plain"), quiet=True)
    assert strip_time(plain.history) != strip_time(full.history)


def test_learning_rate_schedules():
    from vqext.objectives import learning_rate

    const = C.RunConfig(arch="x", lr=0.01)
    assert [learning_rate(const, s, 10) for s in (0, 9)] == [0.01, 0.01]
    cos = C.RunConfig(arch="x", lr=0.01, lr_schedule="cosine", warmup=0.2)
    lrs = [learning_rate(cos, s, 10) for s in range(10)]
    assert lrs[0] == pytest.approx(0.005) and lrs[1] == pytest.approx(0.01)  # 2 warmup steps
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:])) and lrs[-1] < 0.001


def test_objective_terms_add_up():
    from vqext.objectives import training_loss

    import vqext

    torch.manual_seed(0)
    model = vqext.create_model("vqformer", "rope", time_steps=8, **TINY["vqformer"])
    x, y = torch.randn(4, 8, 1), torch.randn(4, 8, 1)
    base = float(training_loss(model, x, y, 0, C.RunConfig(arch="vqformer")).detach())
    pred = model(x)
    pred = pred.detach()
    assert base == pytest.approx(float(torch.nn.functional.mse_loss(pred, y)), rel=1e-6)
    last = float(training_loss(model, x, y, 0, C.RunConfig(arch="vqformer", last_weight=2.0, last_k=3)).detach())
    assert last == pytest.approx(base + 2.0 * float(torch.nn.functional.mse_loss(pred[:, -3:], y[:, -3:])), rel=1e-6)
    fed = torch.cat((x[:, :1], pred.detach()[:, :-1]), 1)
    pf = float(training_loss(model, x, y, 0, C.RunConfig(arch="vqformer", pushforward=1)).detach())
    assert pf == pytest.approx(base + float(torch.nn.functional.mse_loss(model(fed), y).detach()), rel=1e-6)
    mae = float(training_loss(model, x, y, 0, C.RunConfig(arch="vqformer", loss="mae", last_weight=1.0,
                                                          last_k=3)).detach())
    l1 = torch.nn.functional.l1_loss
    assert mae == pytest.approx(float(l1(pred, y) + l1(pred[:, -3:], y[:, -3:])), rel=1e-6)


@pytest.mark.parametrize("field, value, message", [
    ("lr_schedule", "linear", "--lr-schedule must be one of constant, cosine"),
    ("warmup", 1.0, "--warmup is a fraction"), ("input_noise", -0.1, "--input-noise must be >= 0"),
    ("last_k", 0, "--last-k must be at least 1"), ("pushforward", -1, "--pushforward must be >= 0"),
    ("loss", "huber", "--loss must be one of mse, mae")])
def test_bad_training_settings_are_named(field, value, message):
    from vqext.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        C.RunConfig(arch="x", **{field: value}).validate()


def test_training_settings_come_from_the_user_then_the_architecture_then_vqext():
    from vqext.models.vqformer import VQFormer

    rec = C.resolve_training("vqformer")
    assert {k: rec[k] for k in VQFormer.recommended_training} == VQFormer.recommended_training
    assert C.resolve_training("vqformer", epochs=3, input_noise=0.0)["epochs"] == 3
    assert C.resolve_training("vqformer", input_noise=0.0)["input_noise"] == 0.0
    assert C.resolve_training("mhvqlnmlp") == C.TRAINING_DEFAULTS  # the log's training


def test_model_without_parameters_is_evaluated_only(tmp_path):
    class RepeatLast(torch.nn.Module):
        def forward(self, x, start_pos=0):
            return x.clone()

    import vqext.train as T

    cfg = tiny_config(epochs=2)
    orig = T.build_model
    try:
        T.build_model = lambda c: RepeatLast()
        res = train(cfg, str(tmp_path), quiet=True)
    finally:
        T.build_model = orig
    ds = res.dataset
    expected = float(((ds.x[ds.val_idx] - ds.y[ds.val_idx]) ** 2).mean())
    assert res.history[-1]["val_loss"] == pytest.approx(expected, rel=1e-6)


def test_an_epoch_of_more_windows_than_there_are_repeats_them_reshuffled():
    from vqext.train import draw_windows

    idx = torch.arange(10, 20)
    g = torch.Generator().manual_seed(0)
    few = draw_windows(idx, 4, g)
    assert len(few) == 4 and len(set(few.tolist())) == 4
    many = draw_windows(idx, 25, torch.Generator().manual_seed(0))
    assert len(many) == 25
    assert sorted(many[:10].tolist()) == sorted(many[10:20].tolist()) == list(range(10, 20))
    assert set(many[20:].tolist()) <= set(range(10, 20)) and many[:10].tolist() != many[10:20].tolist()
    # a prefix of one shuffle, as before, when the epoch is no longer than the windows
    assert torch.equal(draw_windows(idx, 10, torch.Generator().manual_seed(3)),
                       idx[torch.randperm(10, generator=torch.Generator().manual_seed(3))])


def _keep_best_config(**kw):
    # lr 0.1 over 4 epochs: validation is lowest after epoch 3, so "best" and "last" differ
    return dataclasses.replace(tiny_config(epochs=4, keep_best=True, data="synthetic:sine:120", **kw), lr=0.1)


def test_keep_best_ends_with_the_epoch_of_lowest_validation_loss(tmp_path):
    from vqext.train import evaluate

    cfg = _keep_best_config()
    run_dir = str(tmp_path / "best")
    result = train(cfg, run_dir, quiet=True)
    losses = [r["val_loss"] for r in result.history]
    best = min(range(len(losses)), key=losses.__getitem__)
    assert best + 1 < len(losses), "the case no longer exercises a best epoch before the last"
    assert result.epoch_used == best + 1
    assert evaluate(result.model, result.dataset, result.dataset.val_idx, cfg, "cpu") == pytest.approx(losses[best])
    # a run directory forecasts with the same weights
    _, model, _ = load_run(run_dir)
    for k, v in result.model.state_dict().items():
        assert torch.equal(v, model.state_dict()[k]), k
    last = train(dataclasses.replace(cfg, keep_best=False), None, quiet=True)
    assert last.epoch_used == len(losses)
    assert evaluate(last.model, last.dataset, last.dataset.val_idx, cfg, "cpu") == pytest.approx(losses[-1])


def test_keep_best_survives_a_resume(tmp_path):
    full = train(_keep_best_config(), str(tmp_path / "full"), quiet=True)
    part_dir = str(tmp_path / "part")
    train(_keep_best_config(), part_dir, quiet=True, stop_after_epoch=3)
    torch.manual_seed(12345)
    resumed = train(_keep_best_config(), part_dir, quiet=True, resume=True)
    assert resumed.epoch_used == full.epoch_used < 4
    for k, v in full.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k
