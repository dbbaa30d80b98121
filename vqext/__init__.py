"""vqext: small, fast codebook (VQ) time-series forecasters with native kernels."""
from __future__ import annotations

__version__ = "0.1.0"

from . import _native  # noqa: F401  (loads the extension once, warns if it is missing)
from . import ops  # noqa: F401


def __getattr__(name):
    # The registry is imported lazily so `import vqext` never imports plugins.
    if name in ("list_archs", "list_pes", "create_model", "registry"):
        import importlib

        # import_module, not `from . import registry`: that form calls this __getattr__ again.
        registry = importlib.import_module(".registry", __name__)
        return registry if name == "registry" else getattr(registry, name)
    if name in ("forecast", "forecasting"):
        import importlib

        # vqext.forecast is a module that is also callable: vqext.forecast(run_or_model, data, horizon).
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'vqext' has no attribute {name!r}")


__all__ = ["__version__", "ops", "list_archs", "list_pes", "create_model", "forecast", "forecasting"]
