"""Built-in architectures × encodings: build, forward/backward, the log's numbers, cached decoding."""
import collections
import importlib
import math
import sys
import types

import pytest
import torch

import vqext
from vqext import registry
from vqext.errors import VqextError

ARCHS = ["vqlnmlp", "mhvqlnmlp", "vqformer"]
PES = ["none", "randn", "sinpe", "rope"]
SMALL = dict(vocab_size=8, d_model=16, time_steps=12)


def small(arch, **extra):
    hp = dict(SMALL)
    if arch != "vqlnmlp":
        hp["heads"] = 2
    if arch == "vqformer":
        hp["depth"] = 2
    hp.update(extra)
    return hp


def rel_err(a, b):
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


class _StandInVectorQuantizer(torch.nn.Module):
    """Hard VQ with a straight-through gradient, standing in when vqext.nn.quantizer is absent;
    it has the interface of the real one (see vqext/models/_common.py)."""

    def __init__(self, num_codes, dim, heads=1, commitment_weight=0.25):
        super().__init__()
        self.heads, self.beta = heads, commitment_weight
        self.codebook = torch.nn.Parameter(torch.randn(heads, num_codes, dim // heads))

    def forward(self, x):
        xs = x.reshape(*x.shape[:-1], self.heads, -1)
        idx = vqext.ops.nearest_code(xs, self.codebook, metric="l2")[0]  # (..., H)
        q = torch.stack([self.codebook[h][idx[..., h]] for h in range(self.heads)], dim=-2)
        loss = ((q - xs.detach()) ** 2).mean() + self.beta * ((xs - q.detach()) ** 2).mean()
        q = (xs + (q - xs).detach()).reshape(x.shape)
        return _Result(q, idx.squeeze(-1) if self.heads == 1 else idx, loss)


_Result = collections.namedtuple("_Result", "quantized indices loss")


@pytest.fixture(autouse=True, scope="module")
def _hard_quantizer():
    try:
        importlib.import_module("vqext.nn.quantizer")
        yield
        return
    except ImportError:
        pass
    module = types.ModuleType("vqext.nn.quantizer")
    module.VectorQuantizer = _StandInVectorQuantizer
    sys.modules["vqext.nn.quantizer"] = module
    yield
    del sys.modules["vqext.nn.quantizer"]


@pytest.mark.parametrize("quantizer", ["soft", "hard"])
@pytest.mark.parametrize("pe", PES)
@pytest.mark.parametrize("arch", ARCHS)
def test_every_arch_and_encoding_runs_forward_and_backward(arch, pe, quantizer):
    model = vqext.create_model(arch, pe, **small(arch, quantizer=quantizer, freeze_codebook=False))
    x = torch.randn(3, 12, 1)
    y = model(x)
    assert y.shape == (3, 12, 1) and torch.isfinite(y).all()
    loss = torch.nn.functional.mse_loss(y, torch.randn_like(y)) + model.aux_loss
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values()), \
        [n for n, g in grads.items() if g is None]
    assert grads["encoder.weight"].abs().sum() > 0
    if quantizer == "hard":
        assert model.aux_loss.item() > 0
    # a per-batch start_pos works everywhere (within the randn table)
    y2 = model(x, start_pos=torch.tensor([0, 0, 0]))
    torch.testing.assert_close(y2, y)


# ---------------------------------------------------------------- the log (20241223)

SEED_TRAINABLE = {("vqlnmlp", 1): 321, ("mhvqlnmlp", 2): 257, ("mhvqlnmlp", 8): 209}


@pytest.mark.parametrize("pe", PES)
@pytest.mark.parametrize("arch, heads", list(SEED_TRAINABLE))
def test_seed_configurations_have_the_seed_parameter_counts(arch, heads, pe):
    hp = {} if arch == "vqlnmlp" else {"heads": heads}
    model = vqext.create_model(arch, pe, **hp)  # seed defaults: K 512, d 64, T 96, frozen codebook
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == SEED_TRAINABLE[(arch, heads)]
    assert model.state_dict()["quantize.codes.codebook"].shape == (heads, 512, 64 // heads)
    learned = vqext.create_model(arch, pe, freeze_codebook=False, **hp)
    assert sum(p.numel() for p in learned.parameters()) == SEED_TRAINABLE[(arch, heads)] + 512 * 64


def seed_formula(model, x, pe_table=None):
    """The log's forward, written out: encoder, split heads, (+PE), per-head LayerNorm,
    softmax(x C^T / sqrt(d_model)) C, merge, decoder."""
    B, T, _ = x.shape
    H, d = model.heads, model.d_model
    h = model.encoder(x).view(B, T, H, d // H).transpose(1, 2)
    if pe_table is not None:
        h = h + pe_table[:T]
    h = torch.nn.functional.layer_norm(h, (d // H,), model.ln.weight, model.ln.bias)
    codebook = model.quantize.codes.codebook  # (H, K, hd)
    probs = (h @ codebook.transpose(-1, -2) / math.sqrt(d)).softmax(-1)
    return model.decoder((probs @ codebook).transpose(1, 2).reshape(B, T, d))


@pytest.mark.parametrize("arch, hp", [("vqlnmlp", {}), ("mhvqlnmlp", {"heads": 2}), ("mhvqlnmlp", {"heads": 8})])
@pytest.mark.parametrize("pe", ["none", "randn"])
def test_seed_models_compute_the_seed_formula(arch, hp, pe):
    model = vqext.create_model(arch, pe, vocab_size=32, **hp)
    x = torch.randn(2, 96, 1)
    table = model.pe.table if pe == "randn" else None
    torch.testing.assert_close(model(x), seed_formula(model, x, table), rtol=1e-5, atol=1e-5)


def test_randn_encoding_is_fixed_and_raises_past_its_table():
    model = vqext.create_model("vqlnmlp", "randn", vocab_size=8, d_model=16, time_steps=12)
    assert "pe.table" in model.state_dict() and not any("pe" in n for n, _ in model.named_parameters())
    assert torch.allclose(model.pe.table.std(), torch.tensor(0.01), rtol=0.5)
    model(torch.randn(1, 4, 1), start_pos=8)  # positions 8..11: inside
    with pytest.raises(VqextError, match=r"randn positional encoding has a table of 12 positions .* position 12"):
        model(torch.randn(1, 4, 1), start_pos=9)


@pytest.mark.parametrize("pe", ["sinpe", "rope"])
def test_sinpe_and_rope_work_at_any_position(pe):
    model = vqext.create_model("mhvqlnmlp", pe, vocab_size=8, d_model=16, heads=2, time_steps=12)
    x = torch.randn(2, 12, 1)
    far = model(x, start_pos=10_000)
    assert torch.isfinite(far).all()
    assert not torch.allclose(far, model(x))  # the position matters


@pytest.mark.parametrize("arch", ["vqlnmlp", "mhvqlnmlp"])
def test_seed_step_equals_forward(arch):
    model = vqext.create_model(arch, "sinpe", **{k: v for k, v in small(arch).items()})
    x = torch.randn(2, 12, 1)
    cache = model.init_cache(2, start_pos=3)
    steps = torch.cat([model.step(x[:, t:t + 1], cache) for t in range(12)], 1)
    assert cache.pos == 15
    torch.testing.assert_close(steps, model(x, start_pos=3), rtol=1e-5, atol=1e-6)


def test_code_indices_report_the_used_code():
    model = vqext.create_model("mhvqlnmlp", "none", vocab_size=8, d_model=16, heads=2, time_steps=12)
    idx = model.code_indices(torch.randn(3, 12, 1))
    assert idx.shape == (3, 12, 2) and int(idx.max()) < 8


def test_same_seed_gives_the_same_model_and_numbers():
    outs = []
    for _ in range(2):
        torch.manual_seed(7)
        model = vqext.create_model("vqformer", "rope", **small("vqformer"))
        outs.append(model(torch.linspace(-1, 1, 12).view(1, 12, 1)))
    assert torch.equal(outs[0], outs[1])


# ---------------------------------------------------------------- VQFormer cached decoding

@pytest.mark.parametrize("pe", PES)
@pytest.mark.parametrize("kv_heads", [None, 1])
def test_vqformer_cached_decode_equals_full_forward(pe, kv_heads):
    model = vqext.create_model("vqformer", pe, **small("vqformer", heads=4, kv_heads=kv_heads, depth=2,
                                                        time_steps=24))
    x = torch.randn(2, 24, 1)
    full = model(x)
    cache = model.init_cache(2)
    steps = torch.cat([model.step(x[:, t:t + 1], cache) for t in range(24)], 1)
    assert cache.pos == 24
    assert rel_err(steps, full) <= 1e-5


@pytest.mark.parametrize("pe", ["rope", "none"])
def test_vqformer_sliding_window_equals_recomputing_the_window(pe):
    window = 6
    model = vqext.create_model("vqformer", pe, **small("vqformer", depth=1))
    x = torch.randn(2, 20, 1)
    cache = model.init_cache(2, max_len=window)
    for t in range(20):
        y = model.step(x[:, t:t + 1], cache)
        first = max(0, t - window + 1)
        recomputed = model(x[:, first:t + 1], start_pos=first)[:, -1:]
        assert rel_err(y, recomputed) <= 1e-5, t


def test_vqformer_rope_is_shift_invariant_without_absolute_positions():
    model = vqext.create_model("vqformer", "rope", **small("vqformer"))
    x = torch.randn(2, 12, 1)
    assert rel_err(model(x, start_pos=500), model(x)) <= 1e-4


def test_vqformer_step_checks_its_cache():
    model = vqext.create_model("vqformer", "none", **small("vqformer", depth=2))
    other = vqext.create_model("vqformer", "none", **small("vqformer", depth=1))
    with pytest.raises(ValueError, match="the cache has 1 layers but the model has 2"):
        model.step(torch.randn(1, 1, 1), other.init_cache(1))
    with pytest.raises(ValueError, match=r"x_t must be \(B, T, 1\)"):
        model.step(torch.randn(1, 1), model.init_cache(1))


def test_models_reject_bad_input():
    model = vqext.create_model("vqlnmlp", "none", **small("vqlnmlp"))
    with pytest.raises(ValueError, match=r"VQLNMLP: x must be \(B, T, 1\), got \(2, 12\)"):
        model(torch.randn(2, 12))


def test_checkpoint_roundtrip_through_the_resolved_config():
    model = vqext.create_model("vqformer", "sinpe", **small("vqformer"))
    cfg = model.vqext_config
    rebuilt = vqext.create_model(cfg["arch"], cfg["pe"], **cfg["hparams"])
    rebuilt.load_state_dict(model.state_dict())
    x = torch.randn(1, 12, 1)
    torch.testing.assert_close(rebuilt(x), model(x))
    assert registry.get_arch(cfg["arch"]).supports_cache


@pytest.mark.parametrize("arch", ARCHS)
def test_hard_quantizer_codebook_freezes_and_reports_codes(arch):
    frozen = vqext.create_model(arch, "none", **small(arch, quantizer="hard", freeze_codebook=True))
    assert not any("codebook" in n for n, p in frozen.named_parameters() if p.requires_grad)
    learned = vqext.create_model(arch, "none", **small(arch, quantizer="hard", freeze_codebook=False))
    assert any("codebook" in n for n, p in learned.named_parameters() if p.requires_grad)
    if arch != "vqformer":
        idx = learned.code_indices(torch.randn(2, 12, 1))
        assert idx.shape == (2, 12, 1 if arch == "vqlnmlp" else 2)


# ------------------------------------------------------- VQFormer output options (the recommendation)
def _with_ar_weights(model):
    torch.nn.init.normal_(model.ar_skip.weight, std=0.3)
    torch.nn.init.normal_(model.ar_skip.bias)
    return model


@pytest.mark.parametrize("ar_skip", [None, 5])
def test_vqformer_ar_skip_cached_decode_equals_forward(ar_skip):
    torch.manual_seed(3)
    model = _with_ar_weights(vqext.create_model("vqformer", "rope", **small("vqformer", time_steps=12,
                                                                             ar_skip=ar_skip)))
    x = torch.randn(2, 20, 1)
    cache = model.init_cache(2)
    steps = torch.cat([model.step(x[:, t:t + 1], cache) for t in range(20)], 1)
    assert rel_err(steps, model(x)) <= 1e-5


def test_vqformer_ar_skip_sliding_window_equals_recomputing():
    torch.manual_seed(4)
    model = _with_ar_weights(vqext.create_model("vqformer", "rope", **small("vqformer", depth=1)))
    x = torch.randn(2, 20, 1)
    cache = model.init_cache(2, max_len=6)
    for t in range(20):
        first = max(0, t - 5)
        assert rel_err(model.step(x[:, t:t + 1], cache), model(x[:, first:t + 1], start_pos=first)[:, -1:]) <= 1e-5


def test_vqformer_residual_and_skip_start_from_the_input():
    torch.manual_seed(5)
    model = vqext.create_model("vqformer", "rope", **small("vqformer"))
    for p in model.decoder.parameters():
        torch.nn.init.zeros_(p)
    x = torch.randn(2, 12, 1)
    assert torch.equal(model(x), x)  # residual target: output = input + (zero network + zero AR path)
    plain = vqext.create_model("vqformer", "rope", **small("vqformer", residual=False, ar_skip=0,
                                                           codebook_projections=False))
    assert plain.ar_skip is None and isinstance(plain.blocks[0].code_in, torch.nn.Identity)


def test_vqformer_defaults_are_the_recommendation():
    from vqext.models.vqformer import VQFormer

    model = vqext.create_model("vqformer", "rope")
    hp = model.hparams
    assert (hp["d_model"], hp["heads"], hp["depth"], hp["vocab_size"]) == (64, 4, 2, 64)
    assert hp["residual"] and hp["codebook_projections"] and not hp["freeze_codebook"]
    assert model.ar_skip.kernel_size == (96,) and model.blocks[0].quantize.codes.scale == pytest.approx(0.25)
    assert VQFormer.recommended_pe == "rope" and VQFormer.recommended_training["pushforward"] == 2


@pytest.mark.parametrize("hp, message", [(dict(ar_skip=-1), "ar_skip must be None"),
                                         (dict(residual="yes"), "residual must be true or false"),
                                         (dict(codebook_projections=1), "codebook_projections must be true")])
def test_vqformer_rejects_bad_output_options(hp, message):
    with pytest.raises(VqextError, match=message):
        vqext.create_model("vqformer", "rope", **small("vqformer", **hp))


def test_vqformer_step_needs_its_own_cache():
    from vqext.nn.kv_cache import KVCache

    model = vqext.create_model("vqformer", "rope", **small("vqformer"))
    with pytest.raises(ValueError, match="needs the inputs held by a VQFormerCache"):
        model.step(torch.randn(1, 1, 1), KVCache(2))
