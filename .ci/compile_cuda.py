"""Compile (not link) every .cu file under csrc/ with nvcc for sm_80 and sm_90.

The CPU build of torch ships the CUDA headers, so kernels that include them compile here even
without a GPU. Exits non-zero on the first failure, printing nvcc's output.
"""
import glob
import os
import subprocess
import sys
import sysconfig
import tempfile

from torch.utils.cpp_extension import include_paths
import torch

NVCC = os.environ.get("NVCC", "/usr/local/cuda/bin/nvcc")
ARCHS = ["80", "90"]


def main() -> int:
    files = sorted(glob.glob("csrc/**/*.cu", recursive=True))
    if not files:
        print("compile_cuda: no .cu files")
        return 0
    if not os.path.exists(NVCC):
        print(f"compile_cuda: nvcc not found at {NVCC}", file=sys.stderr)
        return 1
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    flags = ["-std=c++17", "-O3", "--expt-relaxed-constexpr", "-DVQEXT_WITH_CUDA",
             f"-D_GLIBCXX_USE_CXX11_ABI={abi}", "-Xcompiler", "-fPIC", "-Icsrc",
             f"-I{sysconfig.get_paths()['include']}"]
    flags += [f"-I{p}" for p in include_paths()]
    flags += [f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHS]
    failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        for f in files:
            out = os.path.join(tmp, os.path.basename(f) + ".o")
            r = subprocess.run([NVCC, "-c", f, "-o", out, *flags], capture_output=True, text=True)
            status = "ok" if r.returncode == 0 else "FAILED"
            print(f"compile_cuda: {f} [sm_{', sm_'.join(ARCHS)}] {status}")
            if r.returncode != 0:
                failed += 1
                print(r.stdout + r.stderr, file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
