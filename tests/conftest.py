import os

import pytest
import torch


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
    """CPU always; CUDA when a device is present and the extension was compiled with it."""
    devs = ["cpu"]
    if torch.cuda.is_available():
        devs.append("cuda")
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
