"""PEP 517 build backend for vqext: setuptools.build_meta, with the installing environment's torch.

vqext's extension must be compiled against the torch it will run with. pip builds in an isolated
environment that hides the installed torch, and listing torch as a build requirement would make pip
download another torch (multi-GB for the default CUDA wheels) and compile against that one. This
backend keeps isolation for everything else and, before any setuptools hook runs setup.py, appends
the one directory that holds the environment's torch to the END of sys.path, so the isolated build
requirements (setuptools, wheel, ninja) still win over the environment's copies.

How the environment's torch is found:
1. If `torch` is already importable here (``--no-build-isolation``, editable installs), nothing is
   done.
2. Otherwise ask ``sys.executable`` where ``import torch`` would come from, in a child process
   whose environment drops PYTHONPATH and PYTHONNOUSERSITE. pip runs build hooks with the
   interpreter it installs into (its own ``sys.executable``, also under ``pip --python``); its
   isolation consists only of a ``sitecustomize`` on PYTHONPATH that strips that interpreter's
   site-packages, plus PYTHONNOUSERSITE=1. Without those two variables the child sees exactly what
   the installed vqext will see at run time: the venv or conda site-packages, a ``--user`` install,
   system site-packages where the venv allows them.
Only a regular package counts (a stray ``torch/`` directory without ``__init__.py`` does not). The
torch found is used in this process only: setuptools runs setup.py in-process, and ninja's compile
jobs need headers and libraries, not a Python path.

Front-ends that build in a throwaway virtual environment of their own (``python -m build``,
``uv``) run the hooks with that environment's interpreter, which has no torch; they then fail with
the one-line message below and work with their ``--no-build-isolation`` option.
"""
import importlib.util
import os
import subprocess
import sys

INSTALL_HINT = "install torch first (pip install torch==2.13.0), then pip install ."

# Printed by the child: the directory holding the torch package and torch's version, tab-separated,
# or nothing when there is no regular torch package. Empty sys.path entries (the working directory,
# here the source tree) are dropped so only installed packages count.
_QUERY = r"""
import importlib.metadata as md, importlib.util as iu, os, sys
sys.path[:] = [p for p in sys.path if p]
spec = iu.find_spec("torch")
if spec is not None and spec.origin and os.path.basename(spec.origin) == "__init__.py":
    try:
        version = md.version("torch")
    except md.PackageNotFoundError:
        version = "unknown"
    print(os.path.dirname(os.path.dirname(spec.origin)) + "\t" + version)
"""

# Set by pip's isolated build to hide the environment's site-packages from the interpreter.
_ISOLATION_VARIABLES = ("PYTHONPATH", "PYTHONNOUSERSITE")


def locate_torch(python: str) -> tuple[str, str] | None:
    """(directory holding `torch`, torch version) as `python` imports it outside pip's isolation."""
    env = {k: v for k, v in os.environ.items() if k not in _ISOLATION_VARIABLES}
    try:
        out = subprocess.run([python, "-c", _QUERY], env=env, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return None
    line = out.stdout.strip()
    if out.returncode != 0 or "\t" not in line:
        return None
    directory, version = line.rsplit("\t", 1)
    return directory, version


def ensure_torch_importable() -> None:
    """Make the environment's torch importable in this process, or exit with one line saying how."""
    if importlib.util.find_spec("torch") is not None:
        return
    found = locate_torch(sys.executable)
    if found is None:
        raise SystemExit(f"vqext: no torch in the environment of {sys.executable}; {INSTALL_HINT}")
    directory, version = found
    if directory not in sys.path:
        sys.path.append(directory)
    importlib.invalidate_caches()
    # pip shows this with -v; it names the torch the extension is compiled against.
    print(f"vqext: building against torch {version} from {directory}", file=sys.stderr)


def _setuptools_hook(name: str):
    # setuptools is imported inside the hook so the locating logic above can be imported (and
    # tested) where setuptools is not installed.
    def hook(*args, **kwargs):
        ensure_torch_importable()
        from setuptools import build_meta
        return getattr(build_meta, name)(*args, **kwargs)
    hook.__name__ = hook.__qualname__ = name
    return hook


# Every setuptools hook runs setup.py, which imports torch, so every hook gets the same preparation.
get_requires_for_build_wheel = _setuptools_hook("get_requires_for_build_wheel")
get_requires_for_build_sdist = _setuptools_hook("get_requires_for_build_sdist")
get_requires_for_build_editable = _setuptools_hook("get_requires_for_build_editable")
prepare_metadata_for_build_wheel = _setuptools_hook("prepare_metadata_for_build_wheel")
prepare_metadata_for_build_editable = _setuptools_hook("prepare_metadata_for_build_editable")
build_wheel = _setuptools_hook("build_wheel")
build_sdist = _setuptools_hook("build_sdist")
build_editable = _setuptools_hook("build_editable")
