"""The in-tree build backend finds the environment's torch inside pip's isolated build.

The fast tests reproduce pip's isolation (its sitecustomize strips the interpreter's site-packages,
PYTHONNOUSERSITE=1) around a throwaway venv holding a stand-in torch; the slow one runs real pip.
"""
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BACKEND = ROOT / "_build" / "vqext_build_backend.py"


def load_backend():
    spec = importlib.util.spec_from_file_location("vqext_build_backend", BACKEND)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_venv(path: Path, torch_kind: str | None) -> tuple[Path, Path]:
    """A pip-less venv; torch_kind "package" adds a stand-in torch 9.9.9, "stray" a bare torch/ dir."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    python = path / "bin" / "python"
    purelib = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                  capture_output=True, text=True, check=True).stdout.strip())
    if torch_kind is not None:
        (purelib / "torch").mkdir()
    if torch_kind == "package":
        (purelib / "torch" / "__init__.py").write_text("__version__ = '9.9.9'\n")
        info = purelib / "torch-9.9.9.dist-info"
        info.mkdir()
        (info / "METADATA").write_text("Metadata-Version: 2.1\nName: torch\nVersion: 9.9.9\n")
    return python, purelib


def run_isolated_like_pip(python: Path, tmp_path: Path, code: str) -> subprocess.CompletedProcess:
    """Run `code` with `python` hidden from its site-packages the way pip's BuildEnvironment does."""
    site_dir = tmp_path / "pip-site"
    site_dir.mkdir()
    (site_dir / "sitecustomize.py").write_text(textwrap.dedent("""
        import os, site, sys
        hidden = {os.path.normcase(p) for p in site.getsitepackages()}
        sys.path[:] = [p for p in sys.path if os.path.normcase(p) not in hidden]
    """))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(PYTHONPATH=str(site_dir), PYTHONNOUSERSITE="1")
    prelude = f"import importlib.util, sys\nsys.path.insert(0, {str(BACKEND.parent)!r})\n"
    return subprocess.run([str(python), "-c", prelude + code], env=env, capture_output=True, text=True,
                          cwd=tmp_path)


def test_backend_finds_the_environments_torch_under_pip_isolation(tmp_path):
    python, purelib = make_venv(tmp_path / "env", "package")
    code = textwrap.dedent("""
        assert importlib.util.find_spec("torch") is None, "isolation did not hide torch"
        import vqext_build_backend
        vqext_build_backend.ensure_torch_importable()
        import torch
        print(torch.__file__, torch.__version__)
        print(sys.path.index(vqext_build_backend.locate_torch(sys.executable)[0]) == len(sys.path) - 1)
    """)
    out = run_isolated_like_pip(python, tmp_path, code)
    assert out.returncode == 0, out.stderr
    torch_file, version, appended_last = out.stdout.split()
    assert Path(torch_file) == purelib / "torch" / "__init__.py"
    assert version == "9.9.9"
    # Appended, not prepended: the isolated build requirements keep precedence.
    assert appended_last == "True"
    assert f"vqext: building against torch 9.9.9 from {purelib}" in out.stderr


def test_backend_without_torch_stops_with_one_line(tmp_path):
    python, _ = make_venv(tmp_path / "env", None)
    out = run_isolated_like_pip(python, tmp_path, "import vqext_build_backend\nvqext_build_backend.get_requires_for_build_wheel()")
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [
        f"vqext: no torch in the environment of {python}; install torch first (pip install torch==2.13.0), "
        "then pip install ."]


def test_locate_torch_ignores_a_directory_that_is_not_a_package(tmp_path):
    python, _ = make_venv(tmp_path / "env", "stray")
    assert load_backend().locate_torch(str(python)) is None


def test_locate_torch_reports_this_environments_torch():
    directory, version = load_backend().locate_torch(sys.executable)
    assert Path(directory) / "torch" == Path(torch.__file__).parent
    assert version == torch.__version__


def test_backend_leaves_sys_path_alone_when_torch_is_importable(monkeypatch):
    # --no-build-isolation and editable installs: torch is already visible, nothing is added.
    monkeypatch.setattr(sys, "path", list(sys.path))
    before = list(sys.path)
    load_backend().ensure_torch_importable()
    assert sys.path == before


@pytest.mark.slow
def test_pip_isolated_build_sees_the_installed_torch(tmp_path):
    # Real pip, build isolation on, metadata only (no compile, installs nothing): setup.py imports
    # torch and records its version, so success proves the isolated build saw this environment's torch.
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("*.so", "*.o", "__pycache__", "_build_info.py", "build", "*.egg-info")
    for name in ("_build", "csrc", "vqext"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    for name in ("setup.py", "pyproject.toml", "MANIFEST.in", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1")
    out = subprocess.run([sys.executable, "-m", "pip", "install", "-v", "--dry-run", "--no-deps", "."],
                         cwd=src, env=env, capture_output=True, text=True)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-3000:]
    assert f"vqext: building against torch {torch.__version__}" in log
    assert "Downloading torch" not in log
    build_info = (src / "vqext" / "_build_info.py").read_text()
    assert f"TORCH_VERSION = {torch.__version__!r}" in build_info
