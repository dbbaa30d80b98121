"""CUDA kernels: behaviour the CPU tests cannot reach (NaN rows, the backward's input checks,
grids beyond 65535 batches or heads, the current stream). Skipped without a GPU; `.ci/gpu-check`
runs them."""
import math

import pytest
import torch

from vqext import _native
from vqext.ops import apply_rope, nearest_code, nearest_code_reference, rope_attention
from vqext.ops.reference import rope_attention_reference

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    # Without CUDA kernels every op would run its reference here and each test would be vacuous.
    pytest.mark.skipif(not (_native.native_available() and _native.cuda_compiled()),
                       reason="vqext._C built without CUDA"),
]


def _rnd(*shape, dtype=torch.float32, seed=0, device="cuda"):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(device, dtype)


def _nan_row_inputs(bad, dtype, device):
    """q (2, 2, 5, 16), shared k, v (1, 2, 300, 16); query row (1, 0, 3) holds `bad`. With inf,
    half of head 0's keys have channel 0 equal to 0 (inf * 0 = NaN) and half 1 (inf - inf)."""
    q, k, v = (_rnd(*s, dtype=dtype, seed=i, device=device)
               for i, s in enumerate(((2, 2, 5, 16), (1, 2, 300, 16), (1, 2, 300, 16))))
    q[1, 0, 3, 0] = bad
    if bad == math.inf:
        k[0, 0, :, 0] = (torch.arange(300, device=device) % 2 == 0).to(dtype)
    return q, k, v


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nan_query_row_is_nan_with_nan_lse(dtype, bad):
    q, k, v = _nan_row_inputs(bad, dtype, "cuda")
    out, lse = torch.ops.vqext.rope_attention_fwd(q, k, v, 0, None, 0, None, False, False, False, 0.25, 1e4)
    assert torch.isnan(out[1, 0, 3]).all(), out[1, 0, 3, :4].tolist()
    assert torch.isnan(lse[1, 0, 3]), float(lse[1, 0, 3])
    rest = torch.ones(out.shape[:-1], dtype=torch.bool, device="cuda")
    rest[1, 0, 3] = False
    ref = rope_attention_reference(q, k, v, scale=0.25)
    tol = dict(atol=3e-5, rtol=3e-5) if dtype == torch.float32 else dict(atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(out[rest], ref[rest], **tol)
    assert torch.isfinite(lse[rest]).all()


@pytest.mark.parametrize("bad", [math.nan, math.inf])
@pytest.mark.parametrize("causal", [False, True])
def test_nan_query_row_backward_matches_cpu_kernel(bad, causal):
    """dq is NaN in that row only; dk and dv hold NaN (never inf) in the head it reads, and
    finite, exact values elsewhere. Non-finite positions match the CPU kernel where the row
    sees every key (non-causal); with a causal mask the CPU kernel also marks keys the row
    masks out, so there CUDA's NaN positions must be a subset of the CPU's."""
    kw = dict(causal=causal, q_offset=250)
    q, k, v = _nan_row_inputs(bad, torch.float64, "cpu")
    grads = {}
    for dev in ("cpu", "cuda"):
        qd, kd, vd = (t.to(dev).requires_grad_() for t in (q, k, v))
        out = rope_attention(qd, kd, vd, **kw)
        grads[dev] = [g.cpu() for g in torch.autograd.grad(out, (qd, kd, vd), torch.ones_like(out))]
    for name, g_cuda, g_cpu in zip("qkv", grads["cuda"], grads["cpu"]):
        assert not torch.isinf(g_cuda).any(), f"d{name} holds inf"
        if causal and name != "q":
            assert not (torch.isnan(g_cuda) & ~torch.isnan(g_cpu)).any(), f"d{name}: NaN where the CPU has none"
        else:
            assert torch.equal(torch.isnan(g_cuda), torch.isnan(g_cpu)), f"d{name}: NaN positions differ"
        fin = torch.isfinite(g_cpu) & torch.isfinite(g_cuda)
        torch.testing.assert_close(g_cuda[fin], g_cpu[fin], atol=1e-9, rtol=1e-8)
    assert torch.isnan(grads["cuda"][0][1, 0, 3]).all()
    assert torch.isfinite(grads["cuda"][1][0, 1]).all() and torch.isfinite(grads["cuda"][2][0, 1]).all()


def _bwd_args(B=2, Hq=2, Tq=5, Tk=7, d=8):
    q, k, v = _rnd(B, Hq, Tq, d, seed=1), _rnd(B, Hq, Tk, d, seed=2), _rnd(B, Hq, Tk, d, seed=3)
    out, lse = torch.ops.vqext.rope_attention_fwd(q, k, v, 0, None, 0, None, True, True, True, d ** -0.5, 1e4)
    return dict(grad_out=torch.ones_like(out), q=q, k=k, v=v, out=out, lse=lse)


def _call_bwd(a):
    return torch.ops.vqext.rope_attention_bwd(a["grad_out"], a["q"], a["k"], a["v"], a["out"], a["lse"], 0, None, 0,
                                              None, True, True, True, a["q"].shape[-1] ** -0.5, 1e4, True)


@pytest.mark.parametrize("name, bad, match", [
    ("lse", lambda t: t[:, :, :-1], "lse must have shape"),
    ("lse", lambda t: t[:1], "lse must have shape"),
    ("lse", lambda t: t.unsqueeze(-1), "lse must have shape"),
    ("lse", lambda t: t.cpu(), "lse must be on"),
    ("out", lambda t: t.cpu(), "out must be on"),
    ("grad_out", lambda t: t.cpu(), "grad_out must be on"),
    ("out", lambda t: t[..., :-2], "out must have q's shape"),
    ("grad_out", lambda t: t[:, :1], "grad_out must have q's shape"),
])
def test_backward_checks_its_inputs(name, bad, match):
    a = _bwd_args()
    a[name] = bad(a[name])
    with pytest.raises(RuntimeError, match=match):
        _call_bwd(a)
    torch.cuda.synchronize()  # no asynchronous fault was left behind
    _call_bwd(_bwd_args())


@pytest.mark.parametrize("B, Hq, Bk, Hk", [(65536, 1, 65536, 1), (2, 65536, 2, 1), (1, 70000, 1, 70000),
                                           (65537, 2, 1, 2)])
def test_attention_beyond_65535_batches_or_heads(B, Hq, Bk, Hk):
    q, k, v = _rnd(B, Hq, 3, 2, seed=1), _rnd(Bk, Hk, 4, 2, seed=2), _rnd(Bk, Hk, 4, 2, seed=3)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    kw = dict(causal=True, rope_q=True, rope_k=True, q_offset=1)
    out = rope_attention(q, k, v, **kw)
    ref = rope_attention_reference(q, k, v, **kw)
    torch.testing.assert_close(out, ref, atol=3e-5, rtol=3e-5)
    go = _rnd(*out.shape, seed=4)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), go), torch.autograd.grad(ref, (q, k, v), go)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_nearest_code_beyond_65535_heads():
    # float64: no near-ties between the kernel's and the reference's rounding
    x, cb = _rnd(70, 70000, 3, dtype=torch.float64, seed=1), _rnd(70000, 5, 3, dtype=torch.float64, seed=2)
    idx, score = nearest_code(x, cb)
    ref_idx, ref_score = nearest_code_reference(x, cb)
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(score, ref_score)


def test_ops_run_on_the_current_stream():
    """A launch on the legacy default stream makes graph capture fail, so capturing every op into
    a CUDA graph proves each kernel runs on the current stream."""
    x, cb = _rnd(1000, 4, 16, seed=1), _rnd(4, 300, 16, seed=2)
    q, k, v = (_rnd(2, 2, 70, 32, seed=s).requires_grad_() for s in (3, 4, 5))
    kw = dict(causal=True, rope_q=True, rope_k=True)

    def step():
        out = rope_attention(q, k, v, **kw)
        grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
        return (nearest_code(x, cb)[0], out, apply_rope(q.detach(), 3)) + grads

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up away from the capture
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(captured, step()):
        assert torch.equal(a, b)


def test_kernels_follow_the_tensors_device():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    with torch.cuda.device(0):
        x, cb = _rnd(100, 16, device="cuda:1"), _rnd(50, 16, seed=1, device="cuda:1")
        assert torch.equal(nearest_code(x, cb)[0], nearest_code_reference(x, cb)[0])
        q = _rnd(1, 2, 9, 8, device="cuda:1")
        torch.testing.assert_close(rope_attention(q, q, q), rope_attention_reference(q, q, q))
