"""nearest_code: agreement with the reference, the tie rule, registration, compile, bad input."""
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vqext import _native
from vqext.ops import nearest_code, nearest_code_reference

from conftest import devices

native = pytest.mark.skipif(not _native.native_available(), reason="native extension not loaded")

# The reference materialises (chunk x K x D) differences; keep each example cheap.
WORK_BUDGET = 3_000_000


def exact_scores(x, codebook, index, metric):
    """Score of the given index, computed directly in float64: (..., H?)."""
    x64, c64 = x.double(), codebook.double()
    if codebook.dim() == 2:
        chosen = c64[index]
    else:
        chosen = c64[torch.arange(codebook.shape[0]), index]
    if metric == "l2":
        return (x64 - chosen).pow(2).sum(-1)
    return (x64 * chosen).sum(-1)


def tolerance(x, codebook, dtype):
    """Error bound of the expanded-form search: a few ulps of ||x||^2 + ||c||^2."""
    eps = {torch.float64: 1e-12, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    scale = x.double().pow(2).sum(-1) + codebook.double().pow(2).sum(-1).max()
    return eps * (scale + 1.0)


def check_against_reference(x, codebook, metric):
    idx, score = nearest_code(x, codebook, metric)
    ref_idx, ref_score = nearest_code_reference(x.cpu(), codebook.cpu(), metric)
    assert idx.dtype == torch.int64 and idx.shape == x.shape[:-1] == score.shape
    assert score.dtype == x.dtype and score.device == x.device
    idx, score = idx.cpu(), score.cpu()
    if idx.numel() == 0:
        return
    K = codebook.shape[-2]
    assert int(idx.min()) >= 0 and int(idx.max()) < K
    xc, cc = x.cpu(), codebook.cpu()
    ours = exact_scores(xc, cc, idx, metric)
    best = exact_scores(xc, cc, ref_idx, metric)
    tol = tolerance(xc, cc, x.dtype)
    # Near-ties may flip, but the chosen code must be as good as the best one up to rounding.
    if metric == "l2":
        assert bool((ours <= best + tol).all()), float((ours - best - tol).max())
    else:
        assert bool((ours >= best - tol).all()), float((best - tol - ours).max())
    # The returned score is the score of the returned index.
    assert torch.allclose(score.double(), ours, rtol=0, atol=0) or bool(((score.double() - ours).abs() <= tol).all())


@st.composite
def problems(draw):
    D = draw(st.integers(1, 256))
    K = draw(st.integers(1, 5000))
    heads = draw(st.sampled_from([0, 0, 1, 2, 3, 8]))  # 0: a single (K, D) codebook
    h = max(heads, 1)
    K = max(1, min(K, WORK_BUDGET // (D * h * 4)))
    N = draw(st.integers(0, max(0, min(5000, WORK_BUDGET // (K * D * h)))))
    lead = draw(st.sampled_from(["flat", "batched"]))
    metric = draw(st.sampled_from(["l2", "ip"]))
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16]))
    layout = draw(st.sampled_from(["contiguous", "strided", "transposed"]))
    seed = draw(st.integers(0, 2**31 - 1))
    return N, D, K, heads, lead, metric, dtype, layout, seed


def make_inputs(N, D, K, heads, lead, dtype, layout, seed, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    tail = (heads, D) if heads else (D,)
    if layout == "strided":  # every other row, and every other element of the last dim
        x = torch.randn(N * 2, *tail[:-1], D * 2, generator=g)[::2, ..., ::2]
    elif layout == "transposed":
        x = torch.randn(*reversed(tail), N, generator=g).permute(*range(len(tail), -1, -1))
    else:
        x = torch.randn(N, *tail, generator=g)
    if lead == "batched" and N % 2 == 0:
        x = x.reshape(2, N // 2, *tail)
    cshape = (heads, K, D) if heads else (K, D)
    codebook = torch.randn(*cshape, generator=g)
    if layout != "contiguous" and K > 1:
        codebook = torch.randn(*cshape[:-2], D, K, generator=g).transpose(-1, -2)
    return x.to(device=device, dtype=dtype), codebook.to(device=device, dtype=dtype)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_agrees_with_reference(problem):
    N, D, K, heads, lead, metric, dtype, layout, seed = problem
    x, codebook = make_inputs(N, D, K, heads, lead, dtype, layout, seed)
    check_against_reference(x, codebook, metric)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("D", [1, 3, 8, 13, 16, 17, 32, 64, 100])
@pytest.mark.parametrize("heads", [0, 4])
@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_agrees_on_kernel_shapes(device, D, heads, metric):
    # Every compile-time D of the CPU kernel and the runtime-D path, K across panel boundaries.
    for K in (1, 7, 16, 33, 300):
        x, codebook = make_inputs(97, D, K, heads, "flat", torch.float32, "contiguous", D * 1000 + K, device)
        check_against_reference(x, codebook, metric)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("heads", [0, 3])
@pytest.mark.parametrize("metric", ["l2", "ip"])
@pytest.mark.parametrize("D", [2, 8, 16, 40])
def test_ties_go_to_smallest_index(device, dtype, heads, metric, D):
    # Small integers make every distance exact in any order of summation, so ties are real ties
    # (duplicate codes, and distinct codes at equal distance) and the index must match exactly.
    g = torch.Generator().manual_seed(D)
    h = max(heads, 1)
    base = torch.randint(-2, 3, (h, 40, D), generator=g)
    dup = base[:, torch.randint(0, 40, (200,), generator=g)]  # many exact duplicates
    codebook = torch.cat([base, dup], 1).to(dtype)
    x = torch.randint(-2, 3, (500, h, D), generator=g).to(dtype)
    if not heads:
        codebook, x = codebook[0], x[:, 0]
    x, codebook = x.to(device), codebook.to(device)
    idx, score = nearest_code(x, codebook, metric)
    ref_idx, ref_score = nearest_code_reference(x.cpu(), codebook.cpu(), metric)
    assert torch.equal(idx.cpu(), ref_idx)
    assert torch.equal(score.cpu(), ref_score)


def test_all_codes_equal_picks_zero():
    idx, _ = nearest_code(torch.randn(50, 8), torch.ones(37, 8))
    assert bool((idx == 0).all())


@native
@pytest.mark.parametrize("isa", ["portable", "avx2", "avx512"])
def test_each_instruction_set_agrees(isa):
    # The instruction set is chosen once per process (VQEXT_CPU_ISA caps it), so each runs in a
    # child; a level the CPU lacks falls back to the best it has, which the child checks.
    code = (
        "import torch, vqext, vqext._native as n\n"
        "from vqext.ops import nearest_code, nearest_code_reference\n"
        "info = n.build_info()\n"
        "order = ['portable', 'avx2', 'avx512']\n"
        f"want = min(order.index({isa!r}), order.index(info['cpu_isa_available']))\n"
        "assert info['cpu_isa'] == order[want], info\n"
        "g = torch.Generator().manual_seed(0)\n"
        "for D in (3, 8, 16, 64, 70):\n"
        "  for K in (1, 9, 513):\n"
        "    x = torch.randint(-2, 3, (300, 2, D), generator=g).float()\n"
        "    c = torch.randint(-2, 3, (2, K, D), generator=g).float()\n"
        "    for m in ('l2', 'ip'):\n"
        "      assert torch.equal(nearest_code(x, c, m)[0], nearest_code_reference(x, c, m)[0]), (D, K, m)\n"
        "x, c = torch.randn(700, 4, 24, generator=g), torch.randn(4, 300, 24, generator=g)\n"
        "i, s = nearest_code(x, c)\n"
        "ri, rs = nearest_code_reference(x, c)\n"
        "assert torch.equal(i, ri)\n"
        "torch.testing.assert_close(s, rs)\n"
    )
    env = dict(os.environ, VQEXT_CPU_ISA=isa)
    env.pop("VQEXT_DISABLE_AVX512", None)
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


@native
def test_unknown_cpu_isa_names_the_variable():
    code = (
        "import warnings\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "  warnings.simplefilter('always')\n"
        "  import vqext._native as n\n"
        "assert not n.native_available()\n"
        "msgs = [str(x.message) for x in w]\n"
        "assert any('VQEXT_CPU_ISA must be portable, avx2 or avx512' in m and 'sse9' in m for m in msgs), msgs\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env=dict(os.environ, VQEXT_CPU_ISA="sse9"))


@pytest.mark.parametrize("threads", [1, 2])
def test_thread_count_does_not_change_result(threads):
    x, c = torch.randn(3000, 16), torch.randn(700, 16)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = nearest_code(x, c)
        torch.set_num_threads(threads)
        many = nearest_code(x, c)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one[0], many[0]) and torch.equal(one[1], many[1])


def test_no_gradient():
    x = torch.randn(10, 4, requires_grad=True)
    c = torch.randn(6, 4, requires_grad=True)
    idx, score = nearest_code(x, c)
    assert not idx.requires_grad and not score.requires_grad


@native
@pytest.mark.parametrize("shape,cshape,metric", [
    ((33, 8), (17, 8), "l2"), ((2, 5, 3, 16), (3, 40, 16), "ip"), ((0, 4), (3, 4), "l2"),
    ((7, 2, 70), (2, 9, 70), "l2"),
])
def test_opcheck(shape, cshape, metric):
    x, c = torch.randn(shape), torch.randn(cshape)
    torch.library.opcheck(torch.ops.vqext.nearest_code.default, (x, c, metric))
    torch.library.opcheck(torch.ops.vqext.nearest_code.default, (x.double(), c.double(), metric))


@native
def test_meta_shapes():
    idx, score = nearest_code(torch.empty(4, 5, 3, 8, device="meta"), torch.empty(3, 16, 8, device="meta"))
    assert idx.shape == (4, 5, 3) and idx.dtype == torch.int64 and score.shape == (4, 5, 3)


def test_torch_compile():
    torch._dynamo.reset()

    def f(x, c):
        idx, score = nearest_code(x, c)
        return c[idx] * 2.0, score.sum()

    compiled = torch.compile(f, fullgraph=_native.native_available())
    for n in (64, 65):  # a second size exercises recompilation / dynamic shapes
        x, c = torch.randn(n, 8), torch.randn(32, 8)
        got, want = compiled(x, c), f(x, c)
        assert torch.equal(got[0], want[0]) and torch.allclose(got[1], want[1])


BAD_INPUTS = [
    # (x, codebook, metric, exception, text naming the problem)
    (torch.randn(5, 4), torch.randn(4), "l2", ValueError, "codebook"),               # codebook rank
    (torch.randn(5, 4), torch.randn(2, 3, 4, 1), "l2", ValueError, "codebook"),      # codebook rank
    (torch.randn(4), torch.randn(2, 3, 4), "l2", ValueError, "x must be"),           # x rank (multi-head)
    (torch.tensor(1.0), torch.randn(3, 1), "l2", ValueError, "x must be"),           # x rank 0
    (torch.randn(5, 4), torch.randn(0, 4), "l2", ValueError, "K = 0"),               # empty codebook
    (torch.randn(5, 4), torch.randn(3, 5), "l2", ValueError, "D"),                   # D mismatch
    (torch.randn(5, 2, 4), torch.randn(3, 6, 4), "l2", ValueError, "H"),             # heads mismatch
    (torch.randn(5, 4), torch.randn(3, 4), "cosine", ValueError, "metric"),          # bad metric
    (torch.randn(5, 4), torch.randn(3, 4).double(), "l2", TypeError, "dtype"),       # dtype mix
    (torch.randint(0, 3, (5, 4)), torch.randint(0, 3, (3, 4)), "l2", TypeError, "floating"),  # int dtype
    (torch.randn(5, 4), torch.randn(3, 4, device="meta"), "l2", ValueError, "device|codebook is on"),  # device mix
    ([[1.0]], torch.randn(3, 1), "l2", TypeError, "x must be a torch.Tensor"),
]


@pytest.mark.parametrize("x,codebook,metric,exc,text", BAD_INPUTS)
def test_bad_input_names_the_problem(x, codebook, metric, exc, text):
    with pytest.raises(exc, match=text):
        nearest_code(x, codebook, metric)


@native
@pytest.mark.parametrize("x,codebook,metric,exc,text", [b for b in BAD_INPUTS if isinstance(b[0], torch.Tensor)])
def test_direct_op_call_raises_not_crashes(x, codebook, metric, exc, text):
    with pytest.raises((RuntimeError, ValueError, TypeError)):
        torch.ops.vqext.nearest_code(x, codebook, metric)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("heads", [0, 8])
@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_cuda_agrees_with_reference(dtype, heads, metric):
    for D, K in [(8, 512), (16, 33), (64, 4096), (100, 70)]:
        x, codebook = make_inputs(1000, D, K, heads, "flat", dtype, "strided", D + K, "cuda")
        check_against_reference(x, codebook, metric)
