import os

import pytest
import torch

# Subprocesses (`python -m vqext ...`) must import the installed vqext, not the source tree in the
# working directory: after a non-editable install only the installed copy has the native build.
os.environ["PYTHONSAFEPATH"] = "1"


# Set by .ci/sanitize.sh: the op tests must run against the ASan/UBSan build, never silently on
# the reference ops; tests marked no_sanitize (slow and not about memory safety) are skipped.
SANITIZED_RUN = os.environ.get("VQEXT_REQUIRE_SANITIZED") == "1"


def pytest_configure(config):
    config.addinivalue_line("markers", "no_sanitize: skipped under .ci/sanitize.sh (too slow there)")
    if SANITIZED_RUN:
        from vqext import _native

        if not _native.native_available():
            pytest.exit(f"VQEXT_REQUIRE_SANITIZED=1 but the native extension did not load: {_native.load_error()}",
                        returncode=3)


def pytest_collection_modifyitems(config, items):
    if SANITIZED_RUN:
        skip = pytest.mark.skip(reason="no_sanitize: too slow under the sanitiser")
        for item in items:
            if "no_sanitize" in item.keywords:
                item.add_marker(skip)


def pytest_report_header(config):
    import vqext
    from vqext import _native

    return [f"vqext {vqext.__version__}, torch {torch.__version__}, native={_native.native_available()} "
            f"({_native.load_error() or 'loaded'})"]


@pytest.fixture(autouse=True)
def _deterministic_seed():
    torch.manual_seed(0)
    yield


def devices():
    """CPU always; CUDA when a device is present, marked `cuda` (`pytest -m cuda` selects it)."""
    devs = ["cpu"]
    if torch.cuda.is_available():
        devs.append(pytest.param("cuda", marks=pytest.mark.cuda))
    return devs


try:
    from hypothesis import HealthCheck, settings

    # "sanitize": the ASan/UBSan build is ~10x slower; "fuzz": more examples for a deeper run.
    settings.register_profile("sanitize", max_examples=8, deadline=None,
                              suppress_health_check=list(HealthCheck))
    settings.register_profile("fuzz", max_examples=300, deadline=None)
    settings.register_profile("default", deadline=None)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
except ImportError:  # hypothesis is a test extra
    pass
