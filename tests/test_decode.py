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
