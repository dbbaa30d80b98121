"""rope_attention: native kernels against the reference (forward and gradients), gradcheck,
opcheck, torch.compile, decode equivalence, bad input."""
import pytest
import torch

from vqext import _native
from vqext.ops import rope_attention, rope_attention_reference

from conftest import devices

native = pytest.mark.skipif(not _native.native_available(), reason="native extension not built")


def _inputs(B, Hq, Tq, Bk, Hk, Tk, d, dtype=torch.float32, device="cpu", grad=True):
    g = torch.Generator().manual_seed(B * 1000 + Tq * 10 + d)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)  # noqa: E731
    q, k, v = mk(B, Hq, Tq, d), mk(Bk, Hk, Tk, d), mk(Bk, Hk, Tk, d)
    return [t.requires_grad_(grad) for t in (q, k, v)]


def _tol(dtype):
    return dict(atol=1e-10, rtol=1e-9) if dtype == torch.float64 else dict(atol=2e-5, rtol=2e-5)


def _compare(q, k, v, grads=True, **kw):
    out = rope_attention(q, k, v, **kw)
    ref = rope_attention_reference(q, k, v, **kw)
    torch.testing.assert_close(out, ref, **_tol(q.dtype))
    if grads:
        go = torch.randn_like(out)
        got = torch.autograd.grad(out, (q, k, v), go)
        want = torch.autograd.grad(ref, (q, k, v), go)
        for name, a, b in zip("qkv", got, want):
            scale = b.abs().max().clamp_min(1.0)
            torch.testing.assert_close(a / scale, b / scale, **_tol(q.dtype), msg=lambda m: f"grad {name}: {m}")


# (B, Hq, Tq, Bk, Hk, Tk, d, kwargs)
CASES = [
    (2, 2, 5, 2, 2, 7, 8, {}),                                              # Tq != Tk
    (2, 4, 37, 2, 2, 70, 16, dict(causal=True, rope_q=True, rope_k=True, q_offset=33)),  # grouped heads
    (2, 2, 100, 2, 2, 100, 64, dict(causal=True, rope_q=True, rope_k=True)),
    (3, 2, 20, 1, 2, 50, 8, dict(rope_q=True, q_offset=4)),                 # shared (broadcast) k, v
    (2, 8, 1, 2, 2, 90, 32, dict(causal=True, rope_q=True, rope_k=True, q_offset=89)),  # decode step
    (2, 2, 30, 2, 2, 30, 2, dict(causal=True, rope_q=True, rope_k=True, k_offset=10)),  # keys after queries
    (1, 3, 17, 1, 3, 17, 6, dict(causal=True, q_offset=5, k_offset=3, scale=0.3, base=500.0)),
    (2, 2, 65, 2, 2, 129, 128, dict(rope_k=True, k_offset=7)),
    (2, 1, 40, 2, 1, 40, 10, dict(causal=True, rope_q=True, rope_k=True)),
    (3, 2, 40, 1, 2, 130, 64, {}),                                          # shared codebook, d 64
    (2, 2, 300, 2, 1, 300, 8, dict(causal=True, rope_q=True, rope_k=True)),  # kept tiles across chunks
    (2, 2, 200, 2, 1, 600, 8, dict(causal=True, rope_q=True, rope_k=True, q_offset=400)),  # wide tiles
]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}Hq{}Tq{}Bk{}Hk{}Tk{}d{}".format(*c[:7]))
def test_matches_reference(case, dtype, device):
    *shape, kw = case
    _compare(*_inputs(*shape, dtype=dtype, device=device), **kw)


@pytest.mark.parametrize("d", [2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128])
def test_head_sizes(d):
    _compare(*_inputs(2, 2, 19, 2, 1, 23, d), causal=True, rope_q=True, rope_k=True, q_offset=4)


@pytest.mark.parametrize("device", devices())
def test_per_batch_offset_tensors(device):
    q, k, v = _inputs(3, 4, 37, 3, 2, 70, 6, device=device)
    qo = torch.tensor([0, 40, 5], device=device)
    ko = torch.tensor([3, 0, 1], device=device)
    _compare(q, k, v, causal=True, rope_q=True, rope_k=True, q_offset=qo, k_offset=ko)
    # shared keys rotated per batch element, and a one-element tensor
    q, k, v = _inputs(3, 2, 21, 1, 1, 33, 8, device=device)
    _compare(q, k, v, causal=True, rope_q=True, rope_k=True, q_offset=qo, k_offset=ko)
    _compare(q, k, v, causal=True, rope_k=True, q_offset=torch.tensor([9]), k_offset=2)


def test_fully_masked_rows_give_zeros():
    q, k, v = _inputs(2, 2, 10, 2, 2, 10, 8)
    out = rope_attention(q, k, v, causal=True, k_offset=5)  # rows 0..4 see no key
    assert torch.all(out[:, :, :5] == 0)
    _compare(q, k, v, causal=True, k_offset=5)


def test_noncontiguous_inputs():
    q, k, v = _inputs(2, 9, 3, 2, 9, 3, 16, grad=False)  # (B, T, H, d) buffers viewed as (B, H, T, d)
    q, k, v = [t.transpose(1, 2).requires_grad_(True) for t in (q, k, v)]
    assert not q.is_contiguous()
    _compare(q, k, v, causal=True, rope_q=True, rope_k=True)
    q2, k2, v2 = _inputs(2, 3, 12, 2, 3, 12, 32, grad=False)
    _compare(q2[..., ::2].requires_grad_(True), k2[..., ::2].requires_grad_(True), v2[..., ::2].requires_grad_(True))


def test_long_sequence():
    _compare(*_inputs(1, 1, 2048, 1, 1, 2048, 16), causal=True, rope_q=True, rope_k=True)


def test_codebook_attention_shape():
    # the log's soft VQ: every position attends over a shared per-head codebook
    x, c, _ = _inputs(4, 8, 24, 1, 8, 64, 8)
    _compare(x, c, c, scale=64 ** -0.5)


def test_decode_matches_full_causal_forward():
    q, k, v = _inputs(2, 4, 50, 2, 2, 50, 16, grad=False)
    kw = dict(causal=True, rope_q=True, rope_k=True)
    full = rope_attention(q, k, v, **kw)
    steps = [rope_attention(q[:, :, t:t + 1], k[:, :, :t + 1], v[:, :, :t + 1], q_offset=t, **kw)
             for t in range(q.shape[2])]
    torch.testing.assert_close(torch.cat(steps, dim=2), full, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kw", [dict(causal=True, rope_q=True, rope_k=True, q_offset=2),
                                dict(rope_k=True, k_offset=torch.tensor([1, 4]))])
def test_gradcheck(kw):
    q, k, v = _inputs(2, 2, 5, 2, 1, 6, 4, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a, b, c: rope_attention(a, b, c, **kw), (q, k, v))
    q, k, v = _inputs(2, 2, 5, 1, 2, 7, 6, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a, b, c: rope_attention(a, b, c, **kw), (q, k, v))


@native
def test_opcheck():
    q, k, v = _inputs(2, 4, 5, 1, 2, 6, 8)
    op = torch.ops.vqext.rope_attention_fwd.default
    torch.library.opcheck(op, (q, k, v, 2, None, 0, None, True, True, True, 0.3, 10000.0))
    torch.library.opcheck(op, (q, k, v, 0, torch.tensor([1, 3]), 1, None, False, True, False, 0.5, 100.0))
    out, lse = op(q, k, v, 2, None, 0, None, True, True, True, 0.3, 10000.0)
    go = torch.randn_like(out)
    for kv_grad in (True, False):
        torch.library.opcheck(torch.ops.vqext.rope_attention_bwd.default,
                              (go, q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(), 2, None, 0, None,
                               True, True, True, 0.3, 10000.0, kv_grad))


@native
@pytest.mark.parametrize("d, Tk, Bk, causal", [(8, 300, 1, False), (8, 40, 2, True), (16, 300, 1, False),
                                               (64, 520, 1, False), (6, 33, 2, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_frozen_keys_and_values_skip_their_gradients(d, Tk, Bk, causal, dtype):
    """k, v without requires_grad (a frozen codebook): the backward computes dq only, the same dq."""
    q, k, v = _inputs(2, 2, 37, Bk, 2, Tk, d, dtype=dtype)
    kw = dict(causal=causal, rope_q=True, q_offset=Tk - 37 if causal else 0, scale=0.4)
    go = torch.randn(q.shape, dtype=dtype)
    q1 = q.detach().clone().requires_grad_()
    full = torch.autograd.grad(rope_attention(q1, k.detach().requires_grad_(), v.detach().requires_grad_(), **kw),
                               q1, go)[0]
    q2 = q.detach().clone().requires_grad_()
    frozen = torch.autograd.grad(rope_attention(q2, k.detach(), v.detach(), **kw), q2, go)[0]
    torch.testing.assert_close(frozen, full, rtol=1e-6 if dtype == torch.float32 else 1e-12, atol=1e-7)
    q3 = q.detach().clone().requires_grad_()
    ref = torch.autograd.grad(rope_attention_reference(q3, k.detach(), v.detach(), **kw), q3, go)[0]
    torch.testing.assert_close(frozen, ref, **_tol(dtype))
    out, lse = torch.ops.vqext.rope_attention_fwd(q.detach(), k, v, kw["q_offset"], None, 0, None, causal, True,
                                                  False, 0.4, 10000.0)
    dq, dk, dv = torch.ops.vqext.rope_attention_bwd(go, q.detach(), k, v, out, lse, kw["q_offset"], None, 0, None,
                                                    causal, True, False, 0.4, 10000.0, False)
    assert dk.numel() == 0 and dv.numel() == 0
    torch.testing.assert_close(dq, frozen, rtol=0, atol=0)


@native
def test_torch_compile_forward_and_backward():
    q, k, v = _inputs(2, 4, 9, 2, 2, 9, 8)

    def f(a, b, c):
        return rope_attention(a, b, c, causal=True, rope_q=True, rope_k=True).sum()

    compiled = torch.compile(f, fullgraph=True)
    got = torch.autograd.grad(compiled(q, k, v), (q, k, v))
    want = torch.autograd.grad(f(q, k, v), (q, k, v))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_deterministic():
    q, k, v = _inputs(2, 4, 70, 1, 2, 90, 16)
    a = torch.autograd.grad(rope_attention(q, k, v, rope_q=True).sum(), (q, k, v))
    b = torch.autograd.grad(rope_attention(q, k, v, rope_q=True).sum(), (q, k, v))
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def _bad(**over):
    q, k, v = _inputs(2, 4, 5, 2, 2, 6, 8, grad=False)
    args = dict(q=q, k=k, v=v)
    kwargs = {}
    for key, val in over.items():
        (args if key in "qkv" else kwargs)[key] = val
    return args["q"], args["k"], args["v"], kwargs


@pytest.mark.parametrize("over,match", [
    (dict(q=torch.randn(2, 4, 5, 7), k=torch.randn(2, 2, 6, 7), v=torch.randn(2, 2, 6, 7)), "q's head size"),
    (dict(q=torch.randn(4, 5, 8)), "q must have shape"),
    (dict(k=torch.randn(2, 6, 8)), "k must have shape"),
    (dict(v=torch.randn(2, 2, 7, 8)), "v must have k's shape"),
    (dict(k=torch.randn(2, 2, 6, 8, dtype=torch.float64)), "dtype"),
    (dict(k=torch.randn(2, 3, 6, 8), v=torch.randn(2, 3, 6, 8)), "multiple of k's head count"),
    (dict(k=torch.randn(3, 2, 6, 8), v=torch.randn(3, 2, 6, 8)), "batch size"),
    (dict(k=torch.randn(2, 2, 6, 4), v=torch.randn(2, 2, 6, 4)), "k's head size"),
    (dict(q=torch.randn(2, 4, 5, 130), k=torch.randn(2, 2, 6, 130), v=torch.randn(2, 2, 6, 130)), "head size"),
    (dict(q_offset=torch.tensor([1, 2, 3])), "q_offset"),
    (dict(k_offset=torch.tensor([[1, 2]])), "k_offset"),
    (dict(q_offset=torch.tensor([1.0, 2.0])), "q_offset"),
    (dict(k_offset=2.5), "k_offset"),
    (dict(scale="big"), "scale"),
    (dict(base=0.0), "base"),
    (dict(q=torch.randint(0, 5, (2, 4, 5, 8))), "q must be a floating-point"),
])
def test_bad_input(over, match):
    q, k, v, kwargs = _bad(**over)
    with pytest.raises((ValueError, TypeError), match=match):
        rope_attention(q, k, v, **kwargs)


def test_device_mix():
    q, k, v = _inputs(2, 4, 5, 2, 2, 6, 8, grad=False)
    with pytest.raises(ValueError, match="one device"):
        rope_attention(q, k.to("meta"), v.to("meta"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_half_precision(dtype):
    q, k, v = _inputs(2, 4, 70, 2, 2, 70, 64, dtype=torch.float32, device="cuda", grad=False)
    kw = dict(causal=True, rope_q=True, rope_k=True, q_offset=3)
    qh, kh, vh = [t.to(dtype).requires_grad_(True) for t in (q, k, v)]
    out = rope_attention(qh, kh, vh, **kw)
    ref = rope_attention_reference(qh.float(), kh.float(), vh.float(), **kw)
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)
    out.float().sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad.float()).all() for t in (qh, kh, vh))


_PATH_SCRIPT = """
import sys, torch
from vqext.ops import rope_attention
g = torch.Generator().manual_seed(0)
res = []
for (B, Hq, Tq, Bk, Hk, Tk, d, kw) in [
        (3, 2, 40, 1, 2, 130, 64, dict(scale=0.1)),
        (2, 4, 150, 2, 2, 150, 64, dict(causal=True, rope_q=True, rope_k=True)),
        (2, 2, 60, 2, 2, 600, 8, dict(causal=True, rope_q=True, rope_k=True, q_offset=540)),
        (2, 2, 33, 2, 2, 70, 16, dict(rope_k=True, k_offset=3)),
        (3, 2, 20, 1, 2, 300, 8, dict(dtype=torch.float64, scale=0.3)),
        (2, 2, 40, 2, 2, 300, 12, dict(dtype=torch.float64, causal=True, rope_q=True, rope_k=True))]:
    dtype = kw.pop("dtype", torch.float32)
    q = torch.randn(B, Hq, Tq, d, generator=g, dtype=dtype).requires_grad_()
    k = torch.randn(Bk, Hk, Tk, d, generator=g, dtype=dtype).requires_grad_()
    v = torch.randn(Bk, Hk, Tk, d, generator=g, dtype=dtype).requires_grad_()
    out = rope_attention(q, k, v, **kw)
    res.append([out.detach(), *torch.autograd.grad(out, (q, k, v), torch.ones_like(out))])
torch.save(res, sys.argv[1])
"""


@native
def test_instruction_sets_agree(tmp_path):
    """The kernels of each instruction set (VQEXT_CPU_ISA=avx512, avx2, portable; a level the CPU
    lacks falls back to the best it has) agree to rounding, in float32 and float64, for the tile
    and key-lane kernels."""
    import os
    import subprocess
    import sys

    results = []
    for isa in ("avx512", "avx2", "portable"):
        path = tmp_path / f"out_{isa}.pt"
        env = dict(os.environ, VQEXT_CPU_ISA=isa, OMP_NUM_THREADS="1")
        env.pop("VQEXT_DISABLE_AVX512", None)
        subprocess.run([sys.executable, "-c", _PATH_SCRIPT, str(path)], env=env, check=True)
        results.append(torch.load(path))
    for other in results[1:]:
        for case_wide, case_other in zip(results[0], other):
            for a, b in zip(case_wide, case_other):
                torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5)


@native
@pytest.mark.parametrize("Tk", [512, 640, 768, 1024, 1100])  # 512-, 128-, 256-, 512-key tiles, then padding
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_wide_codebook_tiles_agree_with_the_reference(Tk, dtype):
    """Head size 64 over >= 512 unmasked keys takes 128/256/512-key tiles (run_forward)."""
    q, k, v = _inputs(3, 2, 21, 1, 2, Tk, 64, dtype=dtype)
    out = rope_attention(q, k, v, rope_q=True, scale=0.2)
    ref = rope_attention_reference(q, k, v, rope_q=True, scale=0.2)
    torch.testing.assert_close(out, ref, **_tol(dtype))


@native
# unit queries: the bound is 1.44 * big (base 2) over scores of at most 1.44 * 4: kept at 0 and
# 30 (2^-40 or so), redone at 72 (2^-100) and 1e4 (every power 0)
@pytest.mark.parametrize("big", [0.0, 30.0, 72.0, 1e4])
@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_small_head_bound_reference_is_exact_or_falls_back(big, shared, causal, dtype):
    """Head sizes <= 16 over >= 256 keys take each row's softmax reference from |q| max|k| (no
    running max). One key of norm `big` orthogonal to every query makes that bound loose: 40
    below it the bound is kept and still exact; 100 below (and beyond) every power would
    underflow, so the row is redone with the running max. Outputs and gradients match the
    reference either way."""
    g = torch.Generator().manual_seed(7)
    B, H, T, Tk, d = 2, 2, 40, 300, 8
    q = torch.zeros(B, H, T, d, dtype=dtype)
    q[..., :4] = torch.nn.functional.normalize(torch.randn(B, H, T, 4, generator=g, dtype=dtype), dim=-1)
    k = torch.zeros(1 if shared else B, H, Tk, d, dtype=dtype)
    k[..., :4] = torch.randn(k.shape[0], H, Tk, 4, generator=g, dtype=dtype)
    k[:, :, 0, 4] = big  # orthogonal to every query: score 0, norm `big`
    v = torch.randn(k.shape, generator=g, dtype=dtype)
    kw = dict(causal=causal, scale=1.0, q_offset=Tk - T if causal else 0)
    qs, ks, vs = (t.clone().requires_grad_() for t in (q, k, v))
    out = rope_attention(qs, ks, vs, **kw)
    qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
    ref = rope_attention_reference(qr, kr, vr, **kw)
    torch.testing.assert_close(out, ref, **_tol(dtype))
    gout = torch.randn(out.shape, generator=g, dtype=dtype)
    out.backward(gout)
    ref.backward(gout)
    for a, b in ((qs, qr), (ks, kr), (vs, vr)):
        torch.testing.assert_close(a.grad, b.grad, **_tol(dtype))
