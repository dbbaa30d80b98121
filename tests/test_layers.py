"""vqext.nn layers: CodebookAttention, CausalSelfAttention, KVCache (decode, sliding window)."""
import math

import pytest
import torch

from vqext.nn import CausalSelfAttention, CodebookAttention, KVCache
from vqext.ops import apply_rope_reference


def rel_err(a, b):
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


# ---------------------------------------------------------------- CodebookAttention

def explicit_codebook_attention(x_heads, codebook, scale):
    probs = torch.softmax(x_heads @ codebook.transpose(-1, -2) * scale, dim=-1)  # (B, H, T, K)
    return probs @ codebook, probs


@pytest.mark.parametrize("heads", [1, 2, 8])
@pytest.mark.parametrize("scale", [None, 64 ** -0.5])
def test_codebook_attention_matches_matmul_softmax_matmul(heads, scale):
    layer = CodebookAttention(32, 64, heads=heads, scale=scale)
    x = torch.randn(3, 10, 64)
    hd = 64 // heads
    x_heads = x.view(3, 10, heads, hd).transpose(1, 2)
    want, probs = explicit_codebook_attention(x_heads, layer.codebook, hd ** -0.5 if scale is None else scale)
    out, idx = layer(x, return_indices=True)
    assert out.shape == x.shape
    torch.testing.assert_close(out, want.transpose(1, 2).reshape(3, 10, 64), rtol=1e-5, atol=1e-5)
    assert idx.shape == (3, 10, heads) and idx.dtype == torch.int64
    assert torch.equal(idx, probs.argmax(-1).transpose(1, 2))
    # The already-split layout gives the same numbers in the split layout.
    torch.testing.assert_close(layer(x_heads), want, rtol=1e-5, atol=1e-5)


def test_codebook_attention_trains_or_freezes():
    trained = CodebookAttention(8, 16, heads=2)
    assert [n for n, _ in trained.named_parameters()] == ["codebook"]
    trained(torch.randn(2, 5, 16)).sum().backward()
    assert trained.codebook.grad is not None and trained.codebook.grad.abs().sum() > 0

    frozen = CodebookAttention(8, 16, heads=2, freeze=True)
    assert list(frozen.parameters()) == [] and "codebook" in frozen.state_dict()
    x = torch.randn(2, 5, 16, requires_grad=True)
    frozen(x).sum().backward()
    assert x.grad is not None


@pytest.mark.parametrize("bad, message", [
    (dict(num_codes=0, dim=8), "num_codes must be a positive int"),
    (dict(num_codes=4, dim=8, heads=3), "dim 8 is not divisible by heads 3"),
    (dict(num_codes=4, dim=8, scale=-1.0), "scale must be None or a positive finite number"),
])
def test_codebook_attention_rejects_bad_arguments(bad, message):
    with pytest.raises(ValueError, match=message):
        CodebookAttention(**bad)


def test_codebook_attention_rejects_bad_input_shape():
    layer = CodebookAttention(4, 8, heads=2)
    with pytest.raises(ValueError, match=r"x must be \(B, T, 8\) or \(B, 2, T, 4\), got shape \(2, 5, 6\)"):
        layer(torch.randn(2, 5, 6))


# ---------------------------------------------------------------- CausalSelfAttention

def explicit_causal_attention(layer, x, start_pos=0):
    B, T, _ = x.shape
    H, Hk, hd = layer.heads, layer.kv_heads, layer.head_dim
    w = layer.qkv_proj.weight  # rows: q's, then k's, then v's
    q = (x @ w[:H * hd].T).view(B, T, H, hd).transpose(1, 2)
    k, v = (x @ w[H * hd:].T).view(B, T, 2, Hk, hd).permute(2, 0, 3, 1, 4)
    if layer.rope:
        q, k = apply_rope_reference(q, start_pos), apply_rope_reference(k, start_pos)
    k, v = k.repeat_interleave(H // Hk, 1), v.repeat_interleave(H // Hk, 1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    out = torch.softmax(scores, -1) @ v
    return layer.out_proj(out.transpose(1, 2).reshape(B, T, H * hd))


@pytest.mark.parametrize("heads, kv_heads, rope", [(4, None, False), (4, None, True), (4, 2, True), (2, 1, False)])
def test_causal_self_attention_matches_explicit(heads, kv_heads, rope):
    layer = CausalSelfAttention(32, heads, kv_heads=kv_heads, rope=rope)
    x = torch.randn(2, 9, 32)
    for start in (0, 7):
        torch.testing.assert_close(layer(x, start_pos=start), explicit_causal_attention(layer, x, start),
                                   rtol=1e-5, atol=1e-5)


def test_causal_self_attention_is_causal():
    layer = CausalSelfAttention(16, 2, rope=True)
    x = torch.randn(1, 8, 16)
    y = layer(x)
    x2 = x.clone()
    x2[:, 5:] += 1.0
    torch.testing.assert_close(layer(x2)[:, :5], y[:, :5])


def test_per_batch_start_pos_equals_one_row_at_a_time():
    layer = CausalSelfAttention(16, 2, rope=True)
    x = torch.randn(3, 6, 16)
    starts = torch.tensor([0, 4, 11])
    y = layer(x, start_pos=starts)
    for b in range(3):
        torch.testing.assert_close(y[b:b + 1], layer(x[b:b + 1], start_pos=int(starts[b])), rtol=1e-5, atol=1e-6)


def test_causal_self_attention_rejects_bad_arguments():
    with pytest.raises(ValueError, match="rope needs an even head size: d_model 12 / heads 4 = 3"):
        CausalSelfAttention(12, 4, rope=True)
    with pytest.raises(ValueError, match="heads 4 must be a multiple of kv_heads 3"):
        CausalSelfAttention(16, 4, kv_heads=3)
    with pytest.raises(ValueError, match=r"x must be \(B, T, 16\)"):
        CausalSelfAttention(16, 4)(torch.randn(2, 3, 8))


# ---------------------------------------------------------------- KV cache

@pytest.mark.parametrize("rope, kv_heads, start", [(True, None, 0), (True, 2, 5), (False, None, 3), (False, 1, 0)])
def test_step_by_step_decode_equals_full_causal_forward(rope, kv_heads, start):
    layer = CausalSelfAttention(32, 4, kv_heads=kv_heads, rope=rope)
    x = torch.randn(2, 24, 32)
    full = layer(x, start_pos=start)
    cache = KVCache(1, start_pos=start)
    steps = []
    for t in range(x.shape[1]):
        steps.append(layer(x[:, t:t + 1], cache=cache))
        cache.advance(1)
    assert cache.pos == start + 24 and len(cache) == 24
    assert rel_err(torch.cat(steps, 1), full) <= 1e-5


def test_chunked_prefill_then_steps_equals_full_forward():
    layer = CausalSelfAttention(32, 4, rope=True)
    x = torch.randn(2, 20, 32)
    full = layer(x)
    cache = KVCache(1)
    parts = [layer(x[:, :13], cache=cache)]
    cache.advance(13)
    for t in range(13, 20):
        parts.append(layer(x[:, t:t + 1], cache=cache))
        cache.advance(1)
    assert rel_err(torch.cat(parts, 1), full) <= 1e-5


@pytest.mark.parametrize("rope", [True, False])
def test_sliding_window_cache_equals_recomputing_the_window(rope):
    window = 5
    layer = CausalSelfAttention(16, 2, rope=rope)
    x = torch.randn(2, 17, 16)
    cache = KVCache(1, max_len=window)
    for t in range(x.shape[1]):
        y = layer(x[:, t:t + 1], cache=cache)
        cache.advance(1)
        assert len(cache) == min(t + 1, window) and cache.pos == t + 1
        first = max(0, t - window + 1)
        recomputed = layer(x[:, first:t + 1], start_pos=first)[:, -1:]
        assert rel_err(y, recomputed) <= 1e-5, t


def test_kv_cache_rejects_bad_arguments():
    with pytest.raises(ValueError, match="max_len must be None or an int >= 1"):
        KVCache(1, max_len=0)
    with pytest.raises(ValueError, match="start_pos must be an int >= 0"):
        KVCache(1, start_pos=-2)
    cache = KVCache(1)
    cache.append(0, torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4))
    with pytest.raises(ValueError, match="do not match the cached"):
        cache.append(0, torch.randn(1, 3, 1, 4), torch.randn(1, 3, 1, 4))
    with pytest.raises(IndexError, match="layer 1 out of range"):
        cache.append(1, torch.randn(1, 2, 1, 4), torch.randn(1, 2, 1, 4))


def test_cache_with_per_batch_start_positions():
    layer = CausalSelfAttention(16, 2, rope=True)
    x = torch.randn(2, 10, 16)
    starts = torch.tensor([0, 7])
    full = layer(x, start_pos=starts)
    cache = KVCache(1, start_pos=starts)
    steps = []
    for t in range(10):
        steps.append(layer(x[:, t:t + 1], cache=cache))
        cache.advance(1)
    assert torch.equal(cache.pos, starts + 10)
    assert rel_err(torch.cat(steps, 1), full) <= 1e-5
