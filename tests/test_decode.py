"""Cached decoding: the sliding key/value buffers and VQFormer's inference fast path."""
import pytest
import torch

import vqext
from vqext.nn.kv_cache import KVCache, SlidingBuffer


def rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


# ---------------------------------------------------------------- SlidingBuffer against concatenation

@pytest.mark.parametrize("keep", [None, 1, 3, 7])
def test_sliding_buffer_matches_concatenation(keep):
    g = torch.Generator().manual_seed(keep or 0)
    buf = SlidingBuffer(keep, dim=1)
    history = torch.empty(2, 0, 3)
    for step in range(60):
        n = int(torch.randint(1, 5, (), generator=g)) if step % 7 == 0 else 1
        x = torch.randn(2, n, 3, generator=g)
        visible = None if keep is None else keep - 1 + n
        out = buf.append(x, visible)
        history = torch.cat((history, x), 1)
        want = history if visible is None else history[:, -visible:]
        assert torch.equal(out, want), step
        if keep is not None:
            history = history[:, -keep:]
        assert torch.equal(buf.held(), history), step


def test_kv_cache_returns_views_of_one_slab_and_checks_shapes():
    cache = KVCache(2, max_len=4)
    k, v, off = cache.append(0, torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8))
    assert off == 0 and k.shape == (1, 2, 3, 8)
    kv, off = cache.append_kv(1, torch.randn(2, 1, 2, 3, 8))
    assert kv.shape == (2, 1, 2, 3, 8)
    cache.advance(3)
    for _ in range(10):
        k, v, off = cache.append(0, torch.randn(1, 2, 1, 8), torch.randn(1, 2, 1, 8))
        cache.append_kv(1, torch.randn(2, 1, 2, 1, 8))
        cache.advance(1)
        assert k.shape[-2] == 4 and off == cache.pos - 4
    assert len(cache) == 4 and cache.keys[1].shape == (1, 2, 4, 8)
    with pytest.raises(ValueError, match="kv must be keys and values stacked"):
        cache.append_kv(0, torch.randn(1, 2, 1, 8))
    with pytest.raises(ValueError, match="do not match the cached"):
        cache.append_kv(0, torch.randn(2, 1, 3, 1, 8))


# ---------------------------------------------------------------- VQFormer: fast path == module path

CONFIGS = [
    dict(pe="rope"),
    dict(pe="none"),
    dict(pe="rope", kv_heads=1),
    dict(pe="rope", codebook_projections=False, residual=False),
    dict(pe="rope", quantizer="hard"),
    dict(pe="sinpe"),
    dict(pe="rope", ar_skip=0, depth=3),
    dict(pe="rope", ar_skip=5),
]


def _decode(model, x, window, start, fast, mode):
    model.fast_decode = fast
    cache = model.init_cache(x.shape[0], max_len=window, start_pos=start)
    with mode():
        outs = [model.step(x[:, :4], cache)]  # a prefill chunk, then single steps
        outs += [model.step(x[:, t:t + 1], cache) for t in range(4, x.shape[1])]
    return torch.cat(outs, 1)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("window", [None, 6])
def test_vqformer_fast_decode_equals_module_decode(config, window):
    config = dict(config)
    pe = config.pop("pe")
    torch.manual_seed(0)
    hp = dict(vocab_size=16, d_model=16, heads=4, depth=2, time_steps=24)
    hp.update(config)
    model = vqext.create_model("vqformer", pe, **hp).eval()
    x = torch.randn(3, 24, 1)
    start = torch.tensor([0, 3, 11]) if pe == "rope" else 2
    slow = _decode(model, x, window, start, False, torch.no_grad)
    for mode in (torch.no_grad, torch.inference_mode):
        fast = _decode(model, x, window, start, True, mode)
        assert rel_err(fast, slow) <= 1e-5, mode
    if window is None:  # and both equal the full causal forward
        full = model(x, start_pos=start).detach()
        assert rel_err(slow, full) <= 1e-5


def test_fast_decode_sees_in_place_parameter_updates():
    torch.manual_seed(0)
    model = vqext.create_model("vqformer", "rope", vocab_size=16, d_model=16, heads=2, depth=1, time_steps=12).eval()
    x = torch.randn(1, 12, 1)
    cache = model.init_cache(1)
    with torch.inference_mode():
        model.step(x[:, :1], cache)
        model.step(x[:, 1:2], cache)  # the fast path has gathered its parameter list
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)
    model.fast_decode = False
    ref_cache = model.init_cache(1)
    with torch.no_grad():
        ref = [model.step(x[:, t:t + 1], ref_cache) for t in range(3)][-1]
    model.fast_decode = True
    with torch.inference_mode():
        got = model.step(x[:, 2:3], cache)  # keys of steps 0, 1 came from the old weights: compare a fresh run
        fresh = model.init_cache(1)
        got = [model.step(x[:, t:t + 1], fresh) for t in range(3)][-1]
    assert rel_err(got, ref) <= 1e-5


def test_checkpoints_with_separate_q_and_kv_projections_still_load():
    torch.manual_seed(0)
    model = vqext.create_model("vqformer", "rope", vocab_size=16, d_model=16, heads=4, kv_heads=2, depth=1,
                               time_steps=12)
    state = model.state_dict()
    old = {}
    for key, value in state.items():
        if key.endswith("attn.qkv_proj.weight"):
            prefix = key[:-len("qkv_proj.weight")]
            old[prefix + "q_proj.weight"], old[prefix + "kv_proj.weight"] = value[:16].clone(), value[16:].clone()
        else:
            old[key] = value.clone()
    fresh = vqext.create_model("vqformer", "rope", vocab_size=16, d_model=16, heads=4, kv_heads=2, depth=1,
                               time_steps=12)
    fresh.load_state_dict(old)
    x = torch.randn(2, 12, 1)
    assert torch.equal(fresh(x), model(x))


# ---------------------------------------------------------------- the native step (vqformer_decode_step)

native = pytest.mark.skipif(not hasattr(torch.ops.vqext, "vqformer_decode_step") or
                            not vqext._native.native_available(), reason="native extension not built")
NATIVE_CONFIGS = [
    dict(pe="rope"),
    dict(pe="none", kv_heads=2),
    dict(pe="rope", kv_heads=1, codebook_projections=False, residual=False, depth=3),
    dict(pe="rope", ar_skip=30),   # a filter longer than the window: the oldest input repeats
    dict(pe="none", ar_skip=0, heads=1),
]


def _model(config, dtype=torch.float32):
    config = dict(config)
    pe = config.pop("pe")
    torch.manual_seed(0)
    hp = dict(vocab_size=16, d_model=16, heads=4, depth=2, time_steps=24)
    hp.update(config)
    return vqext.create_model("vqformer", pe, **hp).eval().to(dtype)


@native
@pytest.mark.parametrize("config", NATIVE_CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch, window", [(1, None), (3, 6), (20, 5)])
def test_native_step_equals_op_by_op_and_module_paths(config, dtype, batch, window, monkeypatch):
    model = _model(config, dtype)
    assert model._native_decode_args() is not None
    x = torch.randn(batch, 24, 1, dtype=dtype)
    slow = _decode(model, x, window, 5, False, torch.no_grad)
    native_out = _decode(model, x, window, 5, True, torch.inference_mode)
    monkeypatch.setattr(type(model), "_native_decode_args", lambda self: None)
    ops_out = _decode(model, x, window, 5, True, torch.inference_mode)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert rel_err(native_out, slow) <= tol
    assert rel_err(ops_out, slow) <= tol


@native
def test_native_step_is_taken_where_it_applies():
    assert _model(dict(pe="rope"))._native_decode_args() is not None
    assert _model(dict(pe="sinpe"))._native_decode_args() is None          # added table: op-by-op path
    assert _model(dict(pe="rope", quantizer="hard"))._native_decode_args() is None


def _step_args(batch=2):
    model = _model(dict(pe="rope"))
    cache = model.init_cache(batch, max_len=6)
    with torch.inference_mode():
        model.step(torch.randn(batch, 3, 1), cache)
    params, sizes, scalars, _ = model._native_decode_args()
    kv, kv_index = cache.reserve_kv(1)
    inputs, input_index = cache.reserve_input()
    return [torch.randn(batch, 1, 1), params, kv, kv_index, inputs, input_index, sizes, scalars, cache.pos]


@native
def test_native_step_opcheck():
    args = _step_args()
    args[1] = [None if p is None else p.detach() for p in args[1]]
    torch.library.opcheck(torch.ops.vqext.vqformer_decode_step.default, tuple(args),
                          test_utils=("test_schema", "test_faketensor"))


@native
@pytest.mark.parametrize("change, message", [
    (lambda a: a.__setitem__(0, torch.randn(2, 2, 1)), r"x must be \(B, 1, 1\)"),
    (lambda a: a.__setitem__(1, [a[1][0].double()] + list(a[1][1:])), "parameter 0 must be a Float tensor"),
    (lambda a: a.__setitem__(1, a[1][:-1]), "expected 34 parameters"),
    (lambda a: a.__setitem__(2, [k[:, :1] for k in a[2]]), r"kv\[0\] must be a contiguous"),
    (lambda a: a.__setitem__(3, [0, 0, 99] * 2), "kv_index of layer 0 is out of range"),
    (lambda a: a.__setitem__(5, [0, 5, 99]), "input_index is out of range"),
    (lambda a: a.__setitem__(6, [2, 4, 3, 4, 1, 1]), "bad sizes"),
    (lambda a: a.__setitem__(8, -1), "pos must be >= 0"),
])
def test_native_step_rejects_bad_arguments(change, message):
    args = _step_args()
    with torch.inference_mode():
        change(args)
        with pytest.raises(RuntimeError, match=message):
            torch.ops.vqext.vqformer_decode_step(*args)
