"""Benchmark of the fused rope_attention against eager PyTorch on CPU (and CUDA when present).

Baselines, measured in the same run:
  causal self-attention: rotate q and k with the reference RoPE, then
      F.scaled_dot_product_attention(is_causal=True)            ("eager RoPE+SDPA")
  codebook attention (x (B,H,T,dh) over a shared codebook C (1,H,K,dh), no mask):
      softmax(x C^T * scale) C as matmul-softmax-matmul          ("matmul")
      F.scaled_dot_product_attention(x, C, C)                    ("SDPA")
Prints one markdown table: times (ms), GFLOP/s of the attention math, ratio baseline/ours.

    python benchmarks/bench_rope_attention.py            # full grid, threads 1 and 2
    python benchmarks/bench_rope_attention.py --quick    # small subset, a few seconds
    python benchmarks/bench_rope_attention.py --device cuda --quick   # the same on the GPU
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from vqext import _native
from vqext.ops import apply_rope_reference, rope_attention


def timeit(fn, min_time: float, reps_max: int = 50) -> float:
    """Median seconds of fn() after one warm-up call; a call slower than min_time is timed once."""
    def sync():
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    warm = time.perf_counter() - t0
    times = []
    start = time.perf_counter()
    want = 1 if warm > min_time else 3
    while len(times) < want or (time.perf_counter() - start < min_time and len(times) < reps_max):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run_case(make_inputs, ours, baselines: dict, backward: bool, min_time: float):
    """Times ours and each baseline; forward only or forward+backward."""
    def wrap(f):
        def call():
            inputs = make_inputs(backward)
            out = f(*inputs)
            if backward:
                out.backward(torch.ones_like(out))
        return call

    t_ours = timeit(wrap(ours), min_time)
    t_base = {name: timeit(wrap(f), min_time) for name, f in baselines.items()}
    return t_ours, t_base


def causal_cases(quick: bool):
    if quick:
        return [(32, 8, 8, 96), (32, 1, 64, 512)]
    return [(32, H, dh, T) for dh in (8, 64) for H in (1, 8) for T in (96, 512, 2048)]


def causal_flops(B, H, T, dh, backward):
    f = 2 * 2 * B * H * T * T * dh / 2  # QK^T and PV, half of the square under the mask
    return f * (3.5 if backward else 1.0)  # backward: 5 more products (about 2.5x forward)


def bench_causal(B, H, dh, T, backward, min_time, device):
    g = torch.Generator().manual_seed(0)
    q0 = torch.randn(B, H, T, dh, generator=g).to(device)
    k0 = torch.randn(B, H, T, dh, generator=g).to(device)
    v0 = torch.randn(B, H, T, dh, generator=g).to(device)

    def make(bw):
        return [t.detach().requires_grad_(bw) for t in (q0, k0, v0)]

    def ours(q, k, v):
        return rope_attention(q, k, v, causal=True, rope_q=True, rope_k=True)

    def eager(q, k, v):
        return F.scaled_dot_product_attention(apply_rope_reference(q), apply_rope_reference(k), v, is_causal=True)

    return run_case(make, ours, {"eager RoPE+SDPA": eager}, backward, min_time)


def bench_codebook(H, backward, min_time, device, B=64, T=96, K=512, d_model=64):
    dh = d_model // H
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(B, H, T, dh, generator=g).to(device)
    c0 = torch.randn(1, H, K, dh, generator=g).to(device)
    scale = d_model ** -0.5  # the log's scale

    def make(bw):
        return [x0.detach().requires_grad_(bw), c0.detach().requires_grad_(bw)]

    def ours(x, c):
        return rope_attention(x, c, c, scale=scale)

    def matmul(x, c):
        return torch.softmax(torch.matmul(x, c.transpose(-1, -2)) * scale, dim=-1) @ c

    def sdpa(x, c):
        ce = c.expand(B, -1, -1, -1)
        return F.scaled_dot_product_attention(x, ce, ce, scale=scale)

    return run_case(make, ours, {"matmul": matmul, "SDPA": sdpa}, backward, min_time)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a small subset with short timings")
    ap.add_argument("--threads", type=int, nargs="*", default=None, help="thread counts (default 1 2)")
    ap.add_argument("--min-time", type=float, default=None, help="seconds per measurement")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--only", nargs="*", default=None,
                    help="run only cases whose name contains one of these substrings (e.g. 'codebook', 'dh8 T2048')")
    ap.add_argument("--pass", dest="passes", choices=("fwd", "fwd+bwd"), nargs="*", default=None,
                    help="passes to time (default both)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if not _native.use_native(torch.empty(0, device=device)):
        print(f"warning: native kernels unavailable ({_native.load_error()}); timing the reference",
              file=sys.stderr)
    threads = args.threads or ([2] if args.quick else [1, 2])
    min_time = args.min_time if args.min_time is not None else (0.2 if args.quick else 1.0)
    rows = []
    print("| case | threads | pass | ours ms | ours GFLOP/s | baseline | baseline ms | baseline GFLOP/s | speed-up |")
    print("|---|---|---|---|---|---|---|---|---|")
    def wanted(name: str) -> bool:
        return not args.only or any(s in name for s in args.only)

    for nt in threads:
        torch.set_num_threads(nt)
        for backward in (False, True):
            pas = "fwd+bwd" if backward else "fwd"
            if args.passes and pas not in args.passes:
                continue
            for B, H, dh, T in causal_cases(args.quick):
                if not wanted(f"causal RoPE B{B} H{H} dh{dh} T{T}"):
                    continue
                t_ours, base = bench_causal(B, H, dh, T, backward, min_time, device)
                fl = causal_flops(B, H, T, dh, backward)
                for name, tb in base.items():
                    row = (f"causal RoPE B{B} H{H} dh{dh} T{T}", nt, pas, t_ours * 1e3, fl / t_ours / 1e9, name,
                           tb * 1e3, fl / tb / 1e9, tb / t_ours)
                    rows.append(row)
                    print("| %s | %d | %s | %.2f | %.1f | %s | %.2f | %.1f | %.2fx |" % row, flush=True)
            for H in ((8,) if args.quick else (8, 1)):
                B, T, K, dm = 64, 96, 512, 64
                if not wanted(f"codebook B{B} T{T} K{K} H{H} dh{dm // H}"):
                    continue
                t_ours, base = bench_codebook(H, backward, min_time, device)
                fl = 2 * 2 * B * T * K * dm * (3.5 if backward else 1.0)
                for name, tb in base.items():
                    row = (f"codebook B{B} T{T} K{K} H{H} dh{dm // H}", nt, pas, t_ours * 1e3, fl / t_ours / 1e9,
                           name, tb * 1e3, fl / tb / 1e9, tb / t_ours)
                    rows.append(row)
                    print("| %s | %d | %s | %.2f | %.1f | %s | %.2f | %.1f | %.2fx |" % row, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
