"""Nearest-codebook search: vqext vs torch (cdist + argmin, expanded matmul form) vs FAISS.

All methods run in the same process on the same data, interleaved, best of --reps; the ratios
are what matter (other load on the machine moves the absolute numbers). FAISS (IndexFlatL2,
exhaustive search, k = 1) is used when faiss-cpu is installed: `pip install 'vqext[bench]'`.

    python benchmarks/bench_nearest_code.py            # full grid, threads 1 and 2
    python benchmarks/bench_nearest_code.py --quick    # a small subset
    python benchmarks/bench_nearest_code.py --device cuda --quick   # on the GPU (no FAISS; N x 16)
Peak extra memory is the growth of the process's peak RSS during one call (Linux clear_refs), or
of the CUDA allocator's peak on the GPU. The speed targets apply to the CPU; on the GPU the ratios
are reported only.
"""
from __future__ import annotations

import argparse
import gc
import itertools
import os
import sys
import time

import torch

import vqext
from vqext import _native
from vqext.ops import nearest_code

try:
    import faiss  # type: ignore
except ImportError:  # optional benchmark extra
    faiss = None

MiB = 1024 * 1024


def cdist_argmin(x, c):
    return torch.cdist(x, c).argmin(-1)


def expanded_argmin(x, c):
    return (c.pow(2).sum(1) - 2.0 * (x @ c.t())).argmin(-1)


def ours(x, c):
    return nearest_code(x, c)[0]


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    return 0


def peak_extra_bytes(fn) -> float:
    """Peak RSS growth during fn() in bytes, or NaN where the peak cannot be reset."""
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
    except OSError:
        return float("nan")
    before = _rss_kib("VmRSS:")
    out = fn()
    peak = _rss_kib("VmHWM:")
    del out
    return max(0, peak - before) * 1024.0


def peak_extra_bytes_cuda(fn) -> float:
    """Peak CUDA allocator growth during fn() in bytes."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del out
    return max(0, peak - before)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def best_time(fn, reps: int, device: str = "cpu") -> float:
    best = float("inf")
    for _ in range(reps):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t)
    return best


def run(args) -> int:
    dev = args.device
    if args.quick:
        grid = [(16384, 8, 512), (16384, 16, 512), (16384, 64, 4096), (16384, 8, 32)]
    else:
        grid = list(itertools.product([16384, 131072], [8, 16, 64], [32, 512, 4096]))
    if dev == "cuda":  # the CPU sizes take microseconds on a GPU: 16 times more rows
        grid = [(16 * N, D, K) for N, D, K in grid]
        args.threads = args.threads[:1]
    use_faiss = faiss is not None and dev == "cpu"
    native = _native.native_available()
    info = _native.build_info()
    print(f"# nearest_code benchmark: vqext {vqext.__version__}, torch {torch.__version__}, "
          f"native={native}, avx512={info.get('avx512')}, faiss={'yes' if use_faiss else 'no'}, device={dev}"
          f"{' (' + torch.cuda.get_device_name() + ')' if dev == 'cuda' else ''}, "
          f"cpus={os.cpu_count()}, load average at start {os.getloadavg()[0]:.1f}", flush=True)
    header = ("| N | D | K | thr | ours q/s | ours GF/s | FAISS GF/s | cdist GF/s | expanded GF/s "
              "| ours/FAISS | ours/best torch | extra MiB ours | FAISS | torch best |")
    print(header)
    print("|" + "|".join(["---"] * 14) + "|")
    failures = []
    gen = torch.Generator().manual_seed(0)
    for N, D, K in grid:
        x = torch.randn(N, D, generator=gen).to(dev)
        c = torch.randn(K, D, generator=gen).to(dev)
        flops = 2.0 * N * K * D
        index = None
        if use_faiss:
            index = faiss.IndexFlatL2(D)
            index.add(c.numpy())
            xn = x.numpy()
        for threads in args.threads:
            torch.set_num_threads(threads)
            if use_faiss:
                faiss.omp_set_num_threads(threads)
            methods = {"ours": lambda: ours(x, c), "cdist": lambda: cdist_argmin(x, c),
                       "expanded": lambda: expanded_argmin(x, c)}
            if index is not None:
                methods["faiss"] = lambda: index.search(xn, 1)
            # Large torch baselines take seconds per call; fewer repetitions for them.
            reps = {m: (args.reps if (m in ("ours", "faiss") or flops < 2e10 or dev == "cuda") else 1)
                    for m in methods}
            # Warm-up (thread pools, allocator); on the first thread count it also measures the
            # peak extra memory. Slow torch baselines are not warmed again for later counts.
            mem = {}
            for m, fn in methods.items():
                if threads == args.threads[0]:
                    mem[m] = (peak_extra_bytes_cuda(fn) if dev == "cuda" else peak_extra_bytes(fn)) / MiB
                elif reps[m] > 1:
                    fn()
            times = {m: float("inf") for m in methods}
            for _ in range(max(reps.values())):  # interleave so load changes hit all methods alike
                for m, fn in methods.items():
                    if reps[m] > 0:
                        times[m] = min(times[m], best_time(fn, 1, dev))
                reps = {m: r - 1 for m, r in reps.items()}
            gf = {m: flops / t / 1e9 for m, t in times.items()}
            torch_best = max(gf["cdist"], gf["expanded"])
            r_torch = gf["ours"] / torch_best
            r_faiss = gf["ours"] / gf["faiss"] if "faiss" in gf else float("nan")
            mem_torch = min(mem.get("cdist", float("nan")), mem.get("expanded", float("nan")))

            def fmt(v, spec=".1f"):
                return "-" if v != v else format(v, spec)
            print(f"| {N} | {D} | {K} | {threads} | {N / times['ours']:.3g} | {gf['ours']:.1f} | "
                  f"{fmt(gf.get('faiss', float('nan')))} | {gf['cdist']:.1f} | {gf['expanded']:.1f} | "
                  f"{fmt(r_faiss, '.2f')} | {r_torch:.1f} | {fmt(mem.get('ours', float('nan')))} | "
                  f"{fmt(mem.get('faiss', float('nan')))} | {fmt(mem_torch)} |", flush=True)
            if dev != "cpu":
                continue
            if r_torch < 4.0:
                failures.append(f"N={N} D={D} K={K} t={threads}: {r_torch:.1f}x the faster torch form (target 4x)")
            if r_faiss == r_faiss and K >= 512:
                want = 1.5 if (D == 8 and K == 512) else 1.0
                if r_faiss < want:
                    failures.append(f"N={N} D={D} K={K} t={threads}: {r_faiss:.2f}x FAISS (target {want}x)")
            if N == 131072 and K == 4096 and "ours" in mem and mem["ours"] == mem["ours"]:
                limit = 0.05 * N * K * 4 / MiB
                if mem["ours"] > limit:
                    failures.append(f"N={N} K={K}: extra memory {mem['ours']:.1f} MiB > {limit:.1f} MiB")
        del x, c, index
    print()
    if dev != "cpu":
        print("The speed targets apply to the CPU; ratios above are for reading only.")
    elif failures:
        print("Targets missed:")
        for f in failures:
            print(f"- {f}")
    else:
        print("All targets met.")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a small subset of the grid")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--reps", type=int, default=5, help="repetitions (best of) for the fast methods")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
