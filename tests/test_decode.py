"""Cached decoding: the sliding key/value buffers and VQFormer's native step (vqformer_decode_step)."""
import pytest
import torch

import vqext
from vqext.models.vqformer_decode import OP_AVAILABLE, NativeStep, native_step
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

native = pytest.mark.skipif(not OP_AVAILABLE, reason="native extension not built")
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


def _count_native_calls(monkeypatch):
    """Counts the steps the native op answered (NativeStep returning a tensor, not None)."""
    calls = []
    original = NativeStep.__call__

    def counted(self, x_t, cache):
        y = original(self, x_t, cache)
        calls.append(y is not None)
        return y

    monkeypatch.setattr(NativeStep, "__call__", counted)
    return calls


@native
@pytest.mark.parametrize("config", NATIVE_CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch, window", [(1, None), (3, 6), (20, 5)])
def test_native_step_equals_module_path(config, dtype, batch, window, monkeypatch):
    model = _model(config, dtype)
    assert native_step(model) is not None
    x = torch.randn(batch, 24, 1, dtype=dtype)
    slow = _decode(model, x, window, 5, False, torch.no_grad)
    calls = _count_native_calls(monkeypatch)
    native_out = _decode(model, x, window, 5, True, torch.inference_mode)
    assert calls == [True] * 20  # every single step after the prefill chunk
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert rel_err(native_out, slow) <= tol


@native
def test_native_step_is_taken_where_it_applies(monkeypatch):
    assert native_step(_model(dict(pe="rope"))) is not None
    assert native_step(_model(dict(pe="rope", freeze_codebook=True))) is not None  # the codebook is a buffer
    assert native_step(_model(dict(pe="sinpe"))) is None          # an added table: the module path
    assert native_step(_model(dict(pe="rope", quantizer="hard"))) is None
    assert native_step(_model(dict(pe="rope")).half()) is None     # no half kernel
    model = _model(dict(pe="rope"))
    calls = _count_native_calls(monkeypatch)
    cache = model.init_cache(2, start_pos=torch.tensor([0, 4]))
    with torch.inference_mode():
        model.step(torch.randn(2, 3, 1), cache)
        model.step(torch.randn(2, 1, 1), cache)   # per-row positions: the module path
    assert calls == [False]


def _step_args(batch=2, **config):
    model = _model(dict(pe="rope", **config))
    cache = model.init_cache(batch, max_len=6)
    with torch.inference_mode():
        model.step(torch.randn(batch, 3, 1), cache)
    step = native_step(model)
    kv, kv_index = cache.reserve_kv(1)
    inputs, input_index = cache.reserve_input()
    args = [torch.randn(batch, 1, 1), list(step.weight_names), [w.detach() for w in step.weights], kv, kv_index,
            inputs, input_index, cache.pos]
    return args, dict(step.config)


@native
def test_native_step_opcheck():
    args, config = _step_args()
    torch.library.opcheck(torch.ops.vqext.vqformer_decode_step.default, tuple(args), config,
                          test_utils=("test_schema", "test_faketensor"))


def _rename(old, new):
    def change(args, config):
        args[1] = [new if n == old else n for n in args[1]]
    return change


def _set_weight(name, fn):
    def change(args, config):
        i = args[1].index(name)
        args[2][i] = fn(args[2][i])
    return change


def _drop(name):
    def change(args, config):
        i = args[1].index(name)
        del args[1][i], args[2][i]
    return change


def _set(index, value):
    return lambda args, config: args.__setitem__(index, value)


def _configure(**kw):
    return lambda args, config: config.update(kw)


def _duplicate(args, config):
    args[1].append(args[1][0])
    args[2].append(args[2][0])


@native
@pytest.mark.parametrize("change, message", [
    # the weights against the schema in csrc/models/vqformer/decode_params.h
    (_rename("blocks.0.attn.qkv_proj.weight", "blocks.0.attn.qkv.weight"),
     "weight 'blocks.0.attn.qkv.weight' is not one the native step reads"),
    (_rename("encoder.weight", "embed.weight"), "weight 'embed.weight' is not one the native step reads"),
    (_rename("blocks.1.norm_code.bias", "blocks.2.norm_code.bias"),
     "weight 'blocks.2.norm_code.bias' belongs to block 2, but kv holds 2 layers"),
    (_rename("blocks.1.norm_code.bias", "blocks.x.norm_code.bias"), "is not named blocks.<layer>.<field>"),
    (_drop("blocks.1.quantize.codes.codebook"), "missing weight 'blocks.1.quantize.codes.codebook'"),
    (_drop("encoder.weight"), "missing weight 'encoder.weight'"),
    (_drop("blocks.0.code_in.weight"), "'blocks.0.code_in.bias' is given without 'blocks.0.code_in.weight'"),
    (_drop("ar_skip.bias"), "'ar_skip.weight' and 'ar_skip.bias' come together"),
    (_duplicate, "weight 'encoder.weight' is given twice"),
    (_set_weight("blocks.0.norm_attn.weight", lambda w: w.double()),
     "weight 'blocks.0.norm_attn.weight' must be a Float tensor on cpu, got Double"),
    (_set_weight("blocks.1.attn.out_proj.weight", lambda w: w[:, :8]),
     r"weight 'blocks.1.attn.out_proj.weight' has shape \[16, 8\], expected \[16, 16\]"),
    (_set_weight("blocks.0.quantize.codes.codebook", lambda w: w.reshape(2, -1, 4)),
     r"weight 'blocks.0.quantize.codes.codebook' has shape \[2, 32, 4\], expected \[4, 32, 4\]"),
    (_set_weight("encoder.weight", lambda w: w[:, 0]), r"'encoder.weight' must be \(d_model, 1\)"),
    (lambda a, c: a.__setitem__(2, a[2][:-1]), "weight_names has 30 entries but weights has 29"),
    # the other arguments
    (_set(0, torch.randn(2, 2, 1)), r"x must be \(B, 1, 1\)"),
    (_set(0, torch.randn(2, 1, 1).half()), "x must be float32 or float64"),
    (lambda a, c: a.__setitem__(3, [k[:, :1] for k in a[3]]), r"kv\[0\] must be a contiguous"),
    (_set(4, [0, 0, 99] * 2), "kv_index of layer 0 is out of range"),
    (_set(4, [0, 0, 1]), "kv_index needs 3 entries per layer"),
    (_set(6, [0, 5, 99]), "input_index is out of range"),
    (_set(5, torch.empty(0)), "inputs must be a contiguous"),
    (_set(7, -1), "pos must be >= 0"),
    (_configure(kv_heads=3), "heads must be a positive multiple of kv_heads"),
    (_configure(heads=3, kv_heads=1), "d_model 16 .encoder.weight. is not divisible by heads 3"),
    (_configure(heads=16, kv_heads=16), "rope needs an even head size, got 1"),
    (_configure(kv_heads=2), r"has shape \[48, 16\], expected \[32, 16\]"),
    (_configure(eps=0.0), "eps must be > 0"),
])
def test_native_step_rejects_bad_arguments(change, message):
    args, config = _step_args(ar_skip=4)
    with torch.inference_mode():
        change(args, config)
        with pytest.raises(RuntimeError, match=message):
            torch.ops.vqext.vqformer_decode_step(*args, **config)


@native
def test_native_step_reads_every_tensor_of_every_covered_model():
    """The model's named tensors and the op's schema agree for every option the op covers: each
    call below would fail, naming the tensor, if the model had one the op does not read."""
    for config in NATIVE_CONFIGS + [dict(pe="rope", freeze_codebook=True, codebook_projections=False)]:
        model = _model(config)
        step = native_step(model)
        assert step is not None and len(step.weights) == len(list(model.parameters())) + len(list(model.buffers()))
        cache = model.init_cache(2)
        with torch.inference_mode():
            model.step(torch.randn(2, 2, 1), cache)
            assert step(torch.randn(2, 1, 1), cache) is not None
