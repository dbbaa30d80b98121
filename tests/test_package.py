import json
import os
import subprocess
import sys

import pytest
import torch

import vqext
from vqext import _native


def test_native_extension_loaded():
    # CI installs with the README's command; a silent fall back to the reference ops would hide
    # a broken build, so it fails here unless explicitly allowed.
    if os.environ.get("VQEXT_NO_NATIVE") or os.environ.get("VQEXT_ALLOW_NO_NATIVE"):
        pytest.skip("reference ops requested")
    assert _native.native_available(), _native.load_error()
    assert _native.build_info()["torch_version"] == torch.__version__


def test_info_json():
    out = subprocess.run([sys.executable, "-m", "vqext", "info", "--json"], capture_output=True, text=True, check=True)
    data = json.loads(out.stdout)
    assert data["vqext"] == vqext.__version__
    assert data["torch"] == torch.__version__
    assert "cpu" in data["backends_active"] or data["reference_fallback"]


def test_fallback_when_native_disabled():
    code = "import vqext, torch; from vqext import _native; assert not _native.native_available(); " \
           "i, s = vqext.ops.nearest_code(torch.randn(5, 3), torch.randn(4, 3)); assert i.shape == (5,)"
    env = dict(os.environ, VQEXT_NO_NATIVE="1")
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
