"""Targeted checks of the vqext CUDA kernels against the PyTorch reference (a stage of .ci/gpu-check).

Run from the repo root after an in-place CUDA build:  python3 .ci/gpucheck/check_cuda.py [--big]
Prints one PASS/FAIL line per check and exits 1 if any check failed. DEV=cpu runs the same
checks on the CPU kernels (a dry run of this script; the CUDA-only checks are skipped).
--big adds tensors of more than 2^31 elements (about 10 GB of GPU memory).
"""
import math
import os
import sys
import time
import traceback

import torch

from vqext import _native
from vqext.ops import apply_rope, nearest_code, rope_attention
from vqext.ops.reference import apply_rope_reference, nearest_code_reference, rope_attention_reference

DEV = os.environ.get("DEV", "cuda")
CUDA = DEV == "cuda"
BIG = "--big" in sys.argv
assert _native.native_available(), _native.load_error()
if CUDA:
    # Without this the wrappers silently run the reference and every comparison below is vacuous.
    assert _native.cuda_compiled(), "vqext._C was built without CUDA"
    print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(), flush=True)

FAILED = []


def check(name):
    def deco(fn):
        t0 = time.time()
        try:
            fn()
            print(f"PASS {name} ({time.time() - t0:.1f}s)", flush=True)
        except Exception:  # noqa: BLE001
            FAILED.append(name)
            print(f"FAIL {name} ({time.time() - t0:.1f}s)\n{traceback.format_exc(limit=3)}", flush=True)
        return fn
    return deco


def rnd(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(DEV, dtype)


TOL = {torch.float64: dict(atol=1e-10, rtol=1e-9), torch.float32: dict(atol=3e-5, rtol=3e-5),
       torch.float16: dict(atol=2e-2, rtol=2e-2), torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}


def attn_case(B, Hq, Tq, Bk, Hk, Tk, d, dtype=torch.float64, kv_grad=True, **kw):
    q = rnd(B, Hq, Tq, d, dtype=dtype, seed=1).requires_grad_()
    k = rnd(Bk, Hk, Tk, d, dtype=dtype, seed=2).requires_grad_(kv_grad)
    v = rnd(Bk, Hk, Tk, d, dtype=dtype, seed=3).requires_grad_(kv_grad)
    out = rope_attention(q, k, v, **kw)
    # reference in float64 (float32 semantics are the same up to rounding)
    q64, k64, v64 = [t.detach().double().requires_grad_(t.requires_grad) for t in (q, k, v)]
    ref = rope_attention_reference(q64, k64, v64, **kw)
    assert out.shape == q.shape and out.dtype == dtype
    torch.testing.assert_close(out.double(), ref, **TOL[dtype])
    if out.numel() == 0:
        return
    go = rnd(*out.shape, dtype=dtype, seed=4)
    ins = (q, k, v) if kv_grad else (q,)
    got = torch.autograd.grad(out, ins, go)
    want = torch.autograd.grad(ref, (q64, k64, v64) if kv_grad else (q64,), go.double())
    for name, a, b in zip("qkv", got, want):
        if b.numel() == 0:
            assert a.shape == b.shape
            continue
        s = b.abs().max().clamp_min(1.0)
        torch.testing.assert_close(a.double() / s, b / s, **TOL[dtype], msg=lambda m: f"grad {name}: {m}")


# ------------------------------------------------------------------ rope_attention
@check("attention: tile edges x every DMAX (f64, fwd+grads)")
def _():
    for d in (2, 6, 8, 10, 16, 24, 32, 48, 64, 100, 128):
        for Tq, Tk in ((1, 1), (63, 65), (64, 64), (65, 33), (1, 129), (130, 7)):
            attn_case(2, 2, Tq, 2, 1, Tk, d, causal=True, rope_q=True, rope_k=True, q_offset=Tk - 1)


@check("attention: f32 / f16 / bf16 (d 8, 64, 128; grouped, shared kv)")
def _():
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for d in (8, 64, 128):
            attn_case(2, 4, 70, 2, 2, 97, d, dtype=dtype, causal=True, rope_q=True, rope_k=True, q_offset=27)
            attn_case(3, 4, 33, 1, 2, 200, d, dtype=dtype, rope_q=True, q_offset=5)


@check("attention: Bk=1 + per-batch k_offset + rope_k + groups (dk summed over batches)")
def _():
    qo = torch.tensor([0, 40, 5, 300], device=DEV)
    ko = torch.tensor([3, 0, 1, 7], device=DEV)
    for d in (8, 64):
        attn_case(4, 6, 37, 1, 2, 70, d, causal=True, rope_q=True, rope_k=True, q_offset=qo, k_offset=ko)
        attn_case(4, 6, 37, 4, 3, 70, d, causal=True, rope_q=True, rope_k=True, q_offset=qo, k_offset=ko)
        attn_case(4, 2, 20, 1, 1, 70, d, causal=True, rope_k=True, q_offset=torch.tensor([9], device=DEV),
                  k_offset=2)


@check("attention: fully masked rows, keys after queries, huge offsets")
def _():
    attn_case(2, 2, 70, 2, 2, 70, 16, causal=True, rope_q=True, rope_k=True, k_offset=40)
    attn_case(2, 2, 5, 2, 2, 6, 8, causal=True, k_offset=100)  # every row masked: zeros, zero grads
    attn_case(1, 2, 65, 1, 2, 65, 32, dtype=torch.float32, causal=True, rope_q=True, rope_k=True,
              q_offset=2**30, k_offset=2**30)


@check("attention: empty shapes (Tk=0, Tq=0, B=0, Hq=0)")
def _():
    for causal in (False, True):
        attn_case(2, 2, 5, 2, 2, 0, 8, causal=causal)
        attn_case(2, 2, 0, 2, 2, 5, 8, causal=causal)
        attn_case(0, 2, 5, 1, 2, 5, 8, causal=causal)
        attn_case(2, 0, 5, 2, 1, 5, 8, causal=causal)


@check("attention: kv_grad=False (frozen k, v) gives the same dq")
def _():
    for d in (8, 64, 128):
        attn_case(2, 4, 50, 1, 2, 130, d, kv_grad=False, causal=True, rope_q=True, rope_k=True, q_offset=80)
    q = rnd(1, 2, 9, 8).requires_grad_()
    k, v = rnd(1, 2, 9, 8), rnd(1, 2, 9, 8)
    rope_attention(q, k, v).sum().backward()
    assert k.grad is None and v.grad is None and q.grad is not None


@check("attention: non-contiguous and expanded (stride-0) inputs")
def _():
    q = rnd(2, 20, 3, 16).transpose(1, 2).requires_grad_()  # (2, 3, 20, 16) strided
    k = rnd(1, 3, 30, 16).expand(2, 3, 30, 16).requires_grad_()  # stride 0 batch
    v = rnd(2, 3, 30, 32)[..., ::2].requires_grad_()
    out = rope_attention(q, k, v, causal=True, rope_q=True, rope_k=True, q_offset=12)
    ref = rope_attention_reference(q, k, v, causal=True, rope_q=True, rope_k=True, q_offset=12)
    torch.testing.assert_close(out, ref, **TOL[torch.float32])
    go = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), go), torch.autograd.grad(ref, (q, k, v), go)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@check("attention: backward is bitwise deterministic")
def _():
    q, k, v = (rnd(3, 4, 90, 64, seed=s).requires_grad_() for s in (1, 2, 3))
    k, v = k[:1, :2].detach().requires_grad_(), v[:1, :2].detach().requires_grad_()
    runs = []
    for _ in range(2):
        out = rope_attention(q, k, v, causal=True, rope_q=True, rope_k=True, q_offset=10)
        runs.append(torch.autograd.grad(out, (q, k, v), torch.ones_like(out)))
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@check("attention: NaN / inf query row is NaN, other rows exact (docs/reliability.md)")
def _():
    for dtype in (torch.float32, torch.float64):
        for bad in (math.nan, math.inf):
            q, k, v = rnd(2, 2, 5, 16, dtype=dtype), rnd(1, 2, 300, 16, dtype=dtype), rnd(1, 2, 300, 16, dtype=dtype)
            q[1, 0, 3, 0] = bad
            if bad == math.inf:
                k[0, 0, :, 0] = (torch.arange(300, device=DEV) % 2 == 0).to(dtype)
            out = rope_attention(q, k, v)
            assert torch.isnan(out[1, 0, 3]).all(), f"{dtype} {bad}: row is {out[1, 0, 3, :4].tolist()}"
            rest = torch.ones(out.shape[:-1], dtype=torch.bool, device=DEV)
            rest[1, 0, 3] = False
            torch.testing.assert_close(out[rest], rope_attention_reference(q, k, v)[rest], **TOL[dtype])


@check("attention: batch, q heads, kv heads > 65535 (grid beyond gridDim.y/z limits)")
def _():
    for B, Hq, Bk, Hk in ((65536, 1, 65536, 1), (2, 65536, 2, 1), (1, 70000, 1, 70000), (65537, 2, 1, 2)):
        attn_case(B, Hq, 3, Bk, Hk, 4, 2, dtype=torch.float32, causal=True, rope_q=True, rope_k=True, q_offset=1)


@check("stream: ops capture into a CUDA graph (kernels on the current stream)")
def _():
    if not CUDA:
        return
    x, cb = rnd(1000, 4, 16), rnd(4, 300, 16)
    q, k, v = rnd(2, 4, 70, 32), rnd(2, 2, 70, 32), rnd(2, 2, 70, 32)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up on a side stream
        nearest_code(x, cb); rope_attention(q, k, v, causal=True, rope_q=True, rope_k=True); apply_rope(q, 3)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):  # a launch on the legacy default stream makes capture fail
        idx, sc = nearest_code(x, cb)
        out = rope_attention(q, k, v, causal=True, rope_q=True, rope_k=True)
        y = apply_rope(q, 3)
    g.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, rope_attention_reference(q, k, v, causal=True, rope_q=True, rope_k=True),
                               **TOL[torch.float32])
    torch.testing.assert_close(y, apply_rope_reference(q, 3))
    assert torch.equal(idx, nearest_code(x, cb)[0])


@check("device guard: tensors on cuda:1 (needs 2 GPUs)")
def _():
    if not CUDA or torch.cuda.device_count() < 2:
        print("  skipped: one GPU")
        return
    with torch.cuda.device(0):
        x, cb = rnd(100, 16).to("cuda:1"), rnd(50, 16).to("cuda:1")
        torch.testing.assert_close(nearest_code(x, cb)[1], nearest_code_reference(x, cb)[1], atol=1e-4, rtol=1e-4)
        q = rnd(1, 2, 9, 8).to("cuda:1")
        torch.testing.assert_close(rope_attention(q, q, q), rope_attention_reference(q, q, q))


# ------------------------------------------------------------------ apply_rope
@check("apply_rope: shapes, dtypes, per-batch offsets, inverse via autograd")
def _():
    for shape in ((2, 3, 7, 8), (1, 1, 1, 2), (3, 5, 6), (2, 2, 33, 128)):
        for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
            x = rnd(*shape, dtype=dtype)
            off = torch.arange(shape[0], device=DEV) * 1000 + 3
            for o in (0, 1000, off):
                torch.testing.assert_close(apply_rope(x, o).double(), apply_rope_reference(x.double(), o),
                                           **TOL[dtype])
    x = rnd(2, 3, 9, 16, dtype=torch.float64).requires_grad_()
    (g,) = torch.autograd.grad(apply_rope(x, 11), x, apply_rope(x, 11).detach())
    torch.testing.assert_close(g, x.detach())


# ------------------------------------------------------------------ nearest_code
def nc_case(N, K, D, H, metric, dtype, seed=0):
    x = rnd(N, H, D, dtype=dtype, seed=seed) if H else rnd(N, D, dtype=dtype, seed=seed)
    cb = rnd(H, K, D, dtype=dtype, seed=seed + 1) if H else rnd(K, D, dtype=dtype, seed=seed + 1)
    idx, sc = nearest_code(x, cb, metric)
    assert idx.dtype == torch.int64 and sc.dtype == dtype and idx.shape == x.shape[:-1]
    if idx.numel() == 0:
        return
    assert int(idx.min()) >= 0 and int(idx.max()) < K
    x64, c64 = x.double(), cb.double()
    chosen = c64[idx] if not H else c64[torch.arange(H, device=DEV), idx]
    ours = (x64 - chosen).pow(2).sum(-1) if metric == "l2" else (x64 * chosen).sum(-1)
    ref_idx, _ = nearest_code_reference(x64, c64, metric)
    best = c64[ref_idx] if not H else c64[torch.arange(H, device=DEV), ref_idx]
    best = (x64 - best).pow(2).sum(-1) if metric == "l2" else (x64 * best).sum(-1)
    eps = {torch.float64: 1e-12, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    tol = eps * (x64.pow(2).sum(-1) + c64.pow(2).sum(-1).max() + 1)
    assert bool(((ours - best) * (1 if metric == "l2" else -1) <= tol).all())
    assert bool(((sc.double() - ours).abs() <= tol).all())


@check("nearest_code: N, K, D across tile edges (64 rows, 64 codes, 16 dims), all dtypes")
def _():
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        big = (1000, 4097, 100) if CUDA else (200, 1025, 100)
        for N, K, D in ((1, 1, 1), (63, 65, 17), (64, 64, 16), (65, 15, 3), big, (130, 129, 33)):
            for H in (0, 3):
                for metric in ("l2", "ip"):
                    nc_case(N, K, D, H, metric, dtype, seed=N + K + D)


@check("nearest_code: exact ties across lanes and tiles go to the smallest index")
def _():
    g = torch.Generator().manual_seed(0)
    for K0 in (1, 15, 16, 17, 63, 64, 65):
        base = torch.randint(-2, 3, (K0, 8), generator=g)
        cb = base.repeat(5, 1)  # code k ties with k + K0, k + 2 K0, ...
        x = torch.randint(-2, 3, (777, 8), generator=g)
        for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            for metric in ("l2", "ip"):
                idx, sc = nearest_code(x.to(DEV, dtype), cb.to(DEV, dtype), metric)
                ref, rsc = nearest_code_reference(x.double(), cb.double(), metric)
                assert torch.equal(idx.cpu(), ref), (K0, dtype, metric)
                assert int(idx.max()) < K0
                assert torch.equal(sc.cpu().double(), rsc)


@check("nearest_code: NaN rows and NaN codes; non-contiguous x; N = 0")
def _():
    x, cb = rnd(200, 16), rnd(70, 16)
    x[5, 3] = math.nan
    cb[0] = math.nan  # never chosen over a finite code
    idx, sc = nearest_code(x, cb)
    assert 0 <= int(idx.min()) and int(idx.max()) < 70 and torch.isnan(sc[5])
    ok = torch.ones(200, dtype=torch.bool, device=DEV)
    ok[5] = False
    assert not bool((idx[ok] == 0).any())
    xs = rnd(40, 2, 64)[:, :, ::2].transpose(0, 1)  # (2, 40, 32) strided
    nc_idx, _ = nearest_code(xs, rnd(50, 32))
    assert torch.equal(nc_idx, nearest_code(xs.contiguous(), rnd(50, 32))[0])
    i0, s0 = nearest_code(rnd(0, 8), rnd(5, 8))
    assert i0.shape == (0,) and s0.shape == (0,)


@check("nearest_code: more than 65535 heads")
def _():
    nc_case(70, 5, 3, 70000, "l2", torch.float64)
    nc_case(3, 1, 1, 65536, "ip", torch.float32)


# ------------------------------------------------------------------ > 2^31 elements (int32 indexing)
@check("big: nearest_code and attention with more than 2^31 elements (--big)")
def _():
    if not (CUDA and BIG):
        print("  skipped (needs --big on CUDA)")
        return
    N, D = 2**24 + 3, 128  # x: 2.15e9 half elements (4.3 GB)
    x = torch.randn(N, D, device=DEV, dtype=torch.float16)
    cb = torch.randn(8, D, device=DEV, dtype=torch.float16)
    idx, sc = nearest_code(x, cb)
    ri, rs = nearest_code_reference(x[-1000:], cb)
    assert torch.equal(idx[-1000:], ri)
    del x, idx, sc
    Tq = 2**23 + 64  # q: 2 * Tq * 128 > 2^31 elements
    q = torch.randn(1, 2, Tq, 128, device=DEV, dtype=torch.float16, requires_grad=True)
    k = torch.randn(1, 2, 128, 128, device=DEV, dtype=torch.float16)  # frozen: dq only
    v = torch.randn(1, 2, 128, 128, device=DEV, dtype=torch.float16)
    kw = dict(causal=True, rope_q=True, rope_k=True, k_offset=Tq - 128)
    out = rope_attention(q, k, v, **kw)
    (dq,) = torch.autograd.grad(out, q, out.detach())
    qt = q.detach()[:, :, -64:].float().requires_grad_()
    ref = rope_attention_reference(qt, k.float(), v.float(), q_offset=Tq - 64, **kw)
    (rdq,) = torch.autograd.grad(ref, qt, out.detach()[:, :, -64:].float())
    torch.testing.assert_close(out[:, :, -64:].float(), ref, **TOL[torch.float16])
    torch.testing.assert_close(dq[:, :, -64:].float(), rdq, atol=5e-2, rtol=5e-2)


if CUDA:
    torch.cuda.synchronize()  # surfaces any asynchronous fault (illegal address) here
print(f"\n{len(FAILED)} failed: {FAILED}" if FAILED else "\nall checks passed")
sys.exit(1 if FAILED else 0)
