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


@main.command(name="list")
@click.argument("pattern", default="*")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def list_cmd(pattern, as_json):
    """Architectures and positional encodings, where they come from, and plugin errors.

    PATTERN filters names with shell wildcards. Plugins are found through the entry-point groups
    vqext.architectures and vqext.positional_encodings; VQEXT_DISABLE_PLUGINS=1 hides them.

    \b
    Examples:
      vqext list
      vqext list 'mh*'
      vqext list --json
    """
    import fnmatch

    from . import registry

    data = registry.describe()
    for key in ("architectures", "positional_encodings"):
        data[key] = [e for e in data[key] if fnmatch.fnmatchcase(e["name"], pattern)]
    if as_json:
        click.echo(json.dumps(data, indent=2, default=repr))  # plugin defaults may hold odd types
        return

    def source(e):
        return f"{e['package']} {e['version'] or ''}".strip()

    def table(rows, header):
        widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
        for row in [header] + rows:
            click.echo("  " + "  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())

    click.echo("Architectures:")
    rows = [(e["name"], source(e), ", ".join(e.get("accepts", [])) or "-",
             ("yes" if e.get("supports_cache") else "no") if not e["error"] else "-",
             "LOAD ERROR" if e["error"] else "") for e in data["architectures"]]
    table(rows, ("name", "package", "accepts", "kv-cache", "")) if rows else click.echo("  (none)")
    click.echo("Positional encodings:")
    rows = [(e["name"], source(e), e.get("mode", "-"),
             ("any" if e.get("any_position") else "table") if not e["error"] else "-",
             "LOAD ERROR" if e["error"] else "") for e in data["positional_encodings"]]
    table(rows, ("name", "package", "mode", "positions", "")) if rows else click.echo("  (none)")
    if data["errors"]:
        click.echo("Plugin errors:")
        for e in data["errors"]:
            click.echo(f"  {e['kind']} {e['name']!r} from {source(e)} ({e['target']}): {e['error']}")
    if data["conflicts"]:
        click.echo("Name conflicts (vqext's built-ins win, then the distribution whose name sorts first):")
        for c in data["conflicts"]:
            click.echo(f"  {c['kind']} {c['name']!r}: using {c['used']}; ignored {', '.join(c['ignored'])}")
    if data["plugins_disabled"]:
        click.echo("Plugins are disabled (VQEXT_DISABLE_PLUGINS=1): only vqext's built-ins are listed.")


if __name__ == "__main__":
    main()
