"""Compile (not link) every .cu file under csrc/ with nvcc for sm_80 and sm_90.

The CPU build of torch ships the c10/cuda headers but not the one CMake generates for a CUDA
build, c10/cuda/impl/cuda_cmake_macros.h. csrc/common/cuda_compat.h refuses to compile without it
(a real build without it would run kernels on device 0 and the legacy stream), so this check puts
a stub of that header in a temporary include directory: the kernels then compile exactly as a
CUDA build of torch compiles them (CUDAGuard, the current stream, C10_CUDA_KERNEL_LAUNCH_CHECK).
The stub holds what the generated header defines in a shared-library build of torch.

    python .ci/compile_cuda.py                 # every .cu file, sm_80 and sm_90
    python .ci/compile_cuda.py --no-stub       # shows the #error a CPU-only torch gives
    python .ci/compile_cuda.py --arch 90 FILE # one arch, some files (faster)

Exits non-zero on the first failure, printing nvcc's output; prints each file's register and
spill counts (ptxas -v) for the largest head-size family so spills show up in CI logs.
"""
import argparse
import glob
import os
import re
import subprocess
import sys
import sysconfig
import tempfile

from torch.utils.cpp_extension import include_paths
import torch

NVCC = os.environ.get("NVCC", "/usr/local/cuda/bin/nvcc")
ARCHS = ["80", "90"]
GENERATED = "c10/cuda/impl/cuda_cmake_macros.h"
STUB = """#pragma once
// Stub of the header CMake generates for a CUDA build of torch (the CPU wheel lacks it); written
// by .ci/compile_cuda.py for a compile-only check. Matches the generated file of a
// shared-library build.
#define C10_CUDA_BUILD_SHARED_LIBS
"""


def write_stub(tmp: str) -> str:
    inc = os.path.join(tmp, "stub_include")
    path = os.path.join(inc, GENERATED)
    os.makedirs(os.path.dirname(path))
    with open(path, "w") as f:
        f.write(STUB)
    return inc


def spill_summary(ptxas_log: str) -> str:
    """Worst registers and spill stores over the compiled functions, from ptxas -v."""
    regs = [int(m) for m in re.findall(r"Used (\d+) registers", ptxas_log)]
    spills = [int(m) for m in re.findall(r"(\d+) bytes spill stores", ptxas_log)]
    if not regs:
        return ""
    return f"max {max(regs)} registers, {sum(1 for s in spills if s)} of {len(regs)} functions spill"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="*", help="default: every csrc/**/*.cu")
    ap.add_argument("--arch", default=",".join(ARCHS), help="comma-separated compute capabilities (default 80,90)")
    ap.add_argument("--no-stub", action="store_true",
                    help="compile against the installed torch's headers as they are (a CPU wheel must fail)")
    args = ap.parse_args(argv)
    archs = args.arch.split(",")
    files = args.files or sorted(glob.glob("csrc/**/*.cu", recursive=True))
    if not files:
        print("compile_cuda: no .cu files")
        return 0
    if not os.path.exists(NVCC):
        print(f"compile_cuda: nvcc not found at {NVCC}", file=sys.stderr)
        return 1
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    flags = ["-std=c++17", "-O3", "--expt-relaxed-constexpr", "-DVQEXT_WITH_CUDA",
             f"-D_GLIBCXX_USE_CXX11_ABI={abi}", "-Xcompiler", "-fPIC", "-Icsrc", "-Xptxas", "-v",
             f"-I{sysconfig.get_paths()['include']}"]
    flags += [f"-I{p}" for p in include_paths()]
    flags += [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    # One nvcc thread per architecture: the two sm targets of a file compile side by side (the
    # attention kernels take minutes per target).
    flags += ["--threads", str(max(1, min(len(archs), os.cpu_count() or 1)))]
    have_generated = any(os.path.exists(os.path.join(p, GENERATED)) for p in include_paths())
    failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        if args.no_stub:
            mode = "no stub"
        elif have_generated:
            mode = "torch's own c10/cuda headers"
        else:
            flags.insert(0, f"-I{write_stub(tmp)}")
            mode = f"stub {GENERATED}"
        for f in files:
            out = os.path.join(tmp, os.path.basename(f) + ".o")
            r = subprocess.run([NVCC, "-c", f, "-o", out, *flags], capture_output=True, text=True)
            status = "ok" if r.returncode == 0 else "FAILED"
            summary = spill_summary(r.stderr) if r.returncode == 0 else ""
            print(f"compile_cuda: {f} [sm_{', sm_'.join(archs)}; {mode}] {status}"
                  + (f" ({summary})" if summary else ""), flush=True)
            if r.returncode != 0:
                failed += 1
                print(r.stdout + r.stderr, file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
