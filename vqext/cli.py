"""The ``vqext`` command line."""
from __future__ import annotations

import json
import os
import platform
import sys

import click

from .errors import VqextError


class _Group(click.Group):
    """Turns expected errors into one clear line; ``--debug`` shows the traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except KeyboardInterrupt:
            click.echo("vqext: interrupted", err=True)
            sys.exit(130)
        except Exception as exc:  # noqa: BLE001 - the CLI's last line of defence
            if ctx.obj and ctx.obj.get("debug"):
                raise
            kind = "error" if isinstance(exc, (VqextError, ValueError, FileNotFoundError)) else type(exc).__name__
            click.echo(f"vqext: {kind}: {exc}", err=True)
            sys.exit(1 if isinstance(exc, (VqextError, ValueError, FileNotFoundError)) else 2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.version_option(package_name="vqext")
@click.pass_context
def main(ctx, debug):
    """vqext: codebook (VQ) forecasters with native kernels.

    \b
    Examples:
      vqext info
      vqext run --arch mhvqlnmlp --pe rope
      vqext list
    """
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug


def collect_info() -> dict:
    import torch

    from . import __version__, _native

    bi = _native.build_info()
    cuda_active = bool(_native.native_available() and _native.cuda_compiled() and torch.cuda.is_available())
    features = []
    if bi.get("avx2"):
        features.append("avx2")
    if bi.get("avx512"):
        features.append("avx512")
    return {
        "vqext": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "native_loaded": _native.native_available(),
        "native_error": _native.load_error(),
        "built_against_torch": bi.get("torch_version"),
        "backends_compiled": ["cpu"] + (["cuda"] if bi.get("cuda") else []) if _native.native_available() else [],
        "backends_active": (["cpu"] if _native.native_available() else []) + (["cuda"] if cuda_active else []),
        "reference_fallback": not _native.native_available(),
        "openmp": bi.get("openmp", False),
        "omp_threads": torch.get_num_threads(),
        "cpu_features_in_use": features,
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "compiler": bi.get("compiler"),
    }


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def info(as_json):
    """Versions, compiled and active backends, threads and CPU features.

    \b
    Examples:
      vqext info
      vqext info --json
    """
    data = collect_info()
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    width = max(len(k) for k in data)
    for key, value in data.items():
        if isinstance(value, list):
            value = ", ".join(value) or "-"
        click.echo(f"{key:<{width}}  {value}")


if __name__ == "__main__":
    main()
