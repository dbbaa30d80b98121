"""Compile (not link) every .cpp file under csrc/ for aarch64 with Debian's cross compiler.

The build has no x86 flags and the x86 kernels switch their target inside their own translation
units, so every source must compile for a non-x86 target, where the portable kernels are the only
ones. The files are setup.py's C++ sources (the same glob, csrc/**/*.cpp). Installs
g++-aarch64-linux-gnu with apt-get when it is missing; each object is checked to be an aarch64 ELF
file. Exits non-zero on any failure, printing the compiler's output.
"""
import concurrent.futures
import glob
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile

import torch
from torch.utils.cpp_extension import include_paths

CXX = os.environ.get("AARCH64_CXX", "aarch64-linux-gnu-g++")
EM_AARCH64 = 183  # ELF e_machine


def ensure_compiler() -> bool:
    if shutil.which(CXX):
        return True
    apt = ["apt-get"] if os.geteuid() == 0 else ["sudo", "-n", "apt-get"]
    print(f"cross_compile_aarch64: {CXX} not found; installing g++-aarch64-linux-gnu", flush=True)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (apt + ["update", "-q"], apt + ["install", "-y", "-q", "g++-aarch64-linux-gnu"]):
        r = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if r.returncode != 0:
            print(r.stdout + r.stderr, file=sys.stderr)
            print(f"cross_compile_aarch64: {' '.join(cmd)} failed", file=sys.stderr)
            return False
    return shutil.which(CXX) is not None


def flags() -> list[str]:
    # The same language and warning-relevant flags as setup.py's C++ build (no ISA flags there).
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    out = ["-std=c++17", "-O2", "-fPIC", "-fopenmp", "-fno-math-errno", f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
           f'-DVQEXT_TORCH_VERSION="{torch.__version__}"', "-DTORCH_EXTENSION_NAME=_C",
           "-DTORCH_API_INCLUDE_EXTENSION_H", "-Icsrc", f"-I{sysconfig.get_paths()['include']}"]
    return out + [f"-I{p}" for p in include_paths()]


def is_aarch64_object(path: str) -> bool:
    with open(path, "rb") as f:
        head = f.read(20)
    return head[:4] == b"\x7fELF" and int.from_bytes(head[18:20], "little") == EM_AARCH64


def compile_one(src: str, tmp: str, fl: list[str]) -> tuple[str, bool, str]:
    obj = os.path.join(tmp, src.replace("/", "_") + ".o")
    r = subprocess.run([CXX, "-c", src, "-o", obj, *fl], capture_output=True, text=True)
    if r.returncode != 0:
        return src, False, r.stdout + r.stderr
    if not is_aarch64_object(obj):
        return src, False, f"{obj} is not an aarch64 ELF object"
    return src, True, ""


def main() -> int:
    files = sorted(glob.glob("csrc/**/*.cpp", recursive=True))
    if not files:
        print("cross_compile_aarch64: no .cpp files under csrc/", file=sys.stderr)
        return 1
    if not ensure_compiler():
        return 1
    fl = flags()
    failed = 0
    jobs = int(os.environ.get("MAX_JOBS", os.cpu_count() or 1))
    with tempfile.TemporaryDirectory() as tmp, concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        for src, ok, log in pool.map(lambda s: compile_one(s, tmp, fl), files):
            print(f"cross_compile_aarch64: {src} [aarch64] {'ok' if ok else 'FAILED'}", flush=True)
            if not ok:
                failed += 1
                print(log, file=sys.stderr)
    print(f"cross_compile_aarch64: {len(files) - failed} of {len(files)} .cpp files compiled for aarch64")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
