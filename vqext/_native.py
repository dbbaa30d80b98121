"""Loading of the compiled extension ``vqext._C``.

The extension registers the ``torch.ops.vqext.*`` operators. When it is missing, was built
against another torch, or fails to load, vqext still imports: it warns once and every op runs
its pure-PyTorch reference. ``VQEXT_NO_NATIVE=1`` forces the reference path.
``VQEXT_CPU_ISA=portable|avx2|avx512`` caps the instruction set of the CPU kernels (read by _C; an
unknown value is reported here and the reference ops are used).
"""
from __future__ import annotations

import os
import warnings

import torch

_state: dict = {"loaded": False, "error": None, "info": {}}


def _load() -> None:
    if os.environ.get("VQEXT_NO_NATIVE", "0") not in ("", "0"):
        _state["error"] = "disabled by VQEXT_NO_NATIVE"
        return
    try:
        from . import _build_info  # written by setup.py next to _C
    except ImportError:
        _state["error"] = "the native extension is not built (install with pip, see README)"
        return
    if _build_info.TORCH_VERSION != torch.__version__:
        _state["error"] = (
            f"the native extension was built against torch {_build_info.TORCH_VERSION} but torch "
            f"{torch.__version__} is installed; reinstall vqext with --no-build-isolation"
        )
        return
    import importlib.util

    if importlib.util.find_spec(f"{__package__}._C") is None:
        _state["error"] = (f"the native extension is not built next to {os.path.dirname(__file__)} "
                           "(a source checkout without a build? see README)")
        return
    try:
        from . import _C  # noqa: F401  (registers torch.ops.vqext.*)
    except Exception as exc:  # ImportError, OSError (missing symbols), ...
        _state["error"] = f"the native extension failed to load: {exc}"
        return
    try:
        info = dict(_C.build_info())
    except ValueError as exc:  # an unknown VQEXT_CPU_ISA
        _state["error"] = str(exc)
        return
    _state["loaded"] = True
    _state["info"] = info


_load()
if _state["error"] and not _state["error"].startswith("disabled"):
    warnings.warn(f"vqext: {_state['error']}; using the PyTorch reference ops (slower).",
                  RuntimeWarning, stacklevel=2)


def native_available() -> bool:
    """True when ``torch.ops.vqext`` kernels are registered."""
    return _state["loaded"]


def cuda_compiled() -> bool:
    return bool(_state["info"].get("cuda", False))


def load_error() -> str | None:
    return _state["error"]


def build_info() -> dict:
    return dict(_state["info"])


def use_native(*tensors: torch.Tensor) -> bool:
    """Whether an op on these tensors should go to the native kernel."""
    if not _state["loaded"]:
        return False
    dev = tensors[0].device.type
    if dev == "cuda":
        return cuda_compiled()
    return dev in ("cpu", "meta")
