"""The ``vqext`` command line."""
from __future__ import annotations

import json
import os
import platform
import sys

import click

from .registry import DEFAULT_ARCH, DEFAULT_FORECAST_ARCH, default_arch
from .errors import VqextError


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so that no later flush meets the closed pipe again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


class _Group(click.Group):
    """Turns expected errors into one clear line; ``--debug`` shows the traceback."""

    def main(self, *args, **kwargs):
        try:
            return super().main(*args, **kwargs)
        finally:
            try:  # what is still buffered goes out now, not in an "Exception ignored" at exit
                sys.stdout.flush()
            except BrokenPipeError:
                _silence_stdout()

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except KeyboardInterrupt:
            click.echo("vqext: interrupted", err=True)
            sys.exit(130)
        except BrokenPipeError:
            # The reader went away (`vqext report runs | head`): stop quietly, like other tools.
            _silence_stdout()
            sys.exit(141)
        except Exception as exc:  # noqa: BLE001 - the CLI's last line of defence
            if ctx.obj and ctx.obj.get("debug"):
                raise
            expected = (VqextError, ValueError, OSError)
            kind = "error" if isinstance(exc, expected) else type(exc).__name__
            if isinstance(exc, OSError) and not isinstance(exc, VqextError) and exc.strerror:
                exc = f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
            click.echo(f"vqext: {kind}: {exc}", err=True)
            sys.exit(1 if isinstance(exc, expected) or isinstance(exc, str) else 2)


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
    _terminate_cleanly()


def _terminate_cleanly() -> None:
    """SIGTERM unwinds like Ctrl-C (temporary files removed, a run that never finished an epoch
    deleted) and exits with 143 instead of dying mid-statement."""
    import signal
    import threading

    def handler(signum, frame):
        from .errors import Terminated

        click.echo("vqext: terminated", err=True)
        raise Terminated(128 + signum)

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)


def collect_info() -> dict:
    import torch

    from . import __version__, _native

    bi = _native.build_info()
    cuda_active = bool(_native.native_available() and _native.cuda_compiled() and torch.cuda.is_available())
    # The CPU kernels' instruction set in use (VQEXT_CPU_ISA caps it), as the features it uses.
    features = {"portable": ["portable"], "avx2": ["avx2"], "avx512": ["avx2", "avx512"]}.get(bi.get("cpu_isa"), [])
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
             ("yes" if e.get("supports_direct") else "no") if not e["error"] else "-",
             "LOAD ERROR" if e["error"] else "") for e in data["architectures"]]
    table(rows, ("name", "package", "accepts", "kv-cache", "direct head", "")) if rows else click.echo("  (none)")
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

# ----------------------------------------------------------------- run / sweep / forecast / report
# hparam name -> (option, type, help). The CLI passes an hparam to the model only when given, so
# each architecture's own defaults fill in the rest (and an arch that lacks e.g. depth says so).
_HPARAM_OPTIONS = {
    "vocab_size": ("--vocab-size", int, "codebook size K (seed: 512)"),
    "d_model": ("--d-model", int, "model width d (seed: 64)"),
    "heads": ("--heads", int, "attention / codebook heads (seed: 2 for none, randn; 8 for sinpe, rope)"),
    "depth": ("--depth", int, "number of layers (architectures that have depth)"),
    "quantizer": ("--quantizer", str, "soft (attention over the codebook) or hard (nearest code)"),
    "codebook_scale": ("--codebook-scale", float, "initial codebook scale"),
}


DATA_OPTION_NAMES = ("format", "id_col", "time_col", "value_col", "fill")


def _data_options(f):
    """How to read --data: its format, the long format's columns, and how to fill gaps."""
    for o in reversed([
        click.option("--format", "format", type=click.Choice(["auto", "long", "wide", "m4", "single"]), default=None,
                     help="layout of the CSV (default: auto, see docs/data.md)."),
        click.option("--id-col", default=None, help="long format: the series id column (default: unique_id)."),
        click.option("--time-col", default=None, help="long format: the timestamp column (default: ds)."),
        click.option("--value-col", default=None, help="long format: the value column (default: y)."),
        click.option("--fill", type=click.Choice(["ffill", "interpolate", "zero", "drop"]), default=None,
                     help="fill gaps in the values (default: a gap is an error naming its line)."),
    ]):
        f = o(f)
    return f


def _data_kwargs(kw) -> dict:
    """The data options the user gave (the loader's defaults stand for the rest)."""
    return {k: kw[k] for k in DATA_OPTION_NAMES if kw.get(k) is not None}


# Over 80 lines: a flat list of option declarations, one per flag, so its length is the flag count.
def _common_training_options(sweep: bool):
    """Options shared by run and sweep; in a sweep, hparams take comma-separated lists."""
    def deco(f):
        opts = [
            click.option("--data", default=None, metavar="CSV",
                         help="CSV file, bundled:airline|nile, or synthetic:sine|trend|random-walk[:N] "
                              "(default: bundled:airline)."),
            click.option("--column", default=None, help="CSV column name or 0-based index (default: last numeric)."),
            click.option("--time-steps", "-T", type=int, default=None,
                         help="window length T (default: 96, or a quarter of a short series)."),
            click.option("--epochs", type=int, default=None,
                         help="training epochs (default: the architecture's recommendation, else 50)."),
            click.option("--lr", type=float, default=None,
                         help="Adam learning rate (default: the architecture's recommendation, else 0.007)."),
            click.option("--batch-size", type=int, default=None, help="default: recommendation, else 32."),
            click.option("--lr-schedule", type=click.Choice(["constant", "cosine"]), default=None,
                         help="learning-rate schedule (default: recommendation, else constant)."),
            click.option("--warmup", type=float, default=None, help="cosine: linear warmup, fraction of all steps."),
            click.option("--grad-clip", type=float, default=None, help="max gradient norm (0: off)."),
            click.option("--input-noise", type=float, default=None,
                         help="std of Gaussian noise on training inputs, normalised units (0: off)."),
            click.option("--last-weight", type=float, default=None,
                         help="extra loss weight on the last --last-k steps of each window (0: off)."),
            click.option("--last-k", type=int, default=None, help="steps that --last-weight covers (16)."),
            click.option("--pushforward", type=int, default=None,
                         help="extra passes on the model's own detached predictions (0: off)."),
            click.option("--loss", type=click.Choice(["mse", "mae"]), default=None,
                         help="the error the training loss measures (default: recommendation, else mse)."),
            click.option("--keep-best/--keep-last", "keep_best", default=None,
                         help="end training with the epoch (0: the untrained model) whose validation loss is "
                              "lowest, or with the last one (default: recommendation, else last)."),
            click.option("--horizon", type=int, default=0,
                         help="the forecast horizon H the run is for: the default --val-size, and a direct "
                              "H-step head where the architecture has one (0: none)."),
            click.option("--direct/--rollout", "direct", default=None,
                         help="with --horizon: train a direct H-step head (default where the architecture has "
                              "one) or only the one-step model that rolls forward."),
            click.option("--val-size", type=int, default=None,
                         help="--split tail: validation points at the end of each series (default: --horizon, "
                              "else --val-fraction of it; 0: train on everything)."),
            click.option("--val-fraction", type=float, default=0.2, show_default=True,
                         help="validation share (of the windows, or of each series for --split tail)."),
            click.option("--normalize", type=click.Choice(["train", "series"]), default=None,
                         help="scale each series with its training part's statistics (train; default for "
                              "--split tail) or all of its points (series; the log's protocol)."),
            click.option("--windows-per-epoch", type=int, default=None,
                         help="windows drawn (afresh) per epoch: fewer than there are bounds an epoch over large "
                              "sets, more repeats them reshuffled (default: the architecture's recommendation, "
                              "else all)."),
            click.option("--split", type=click.Choice(["random", "chronological", "tail"]), default=None,
                         help="train/validation split: of the windows (random: seeded 80/20 like the log; "
                              "chronological: the last windows) or of each series (tail: its last --val-size "
                              "points). Default: tail for several series or with --horizon, else random."),
            click.option("--split-seed", type=int, default=42, show_default=True),
            click.option("--positions", type=click.Choice(["window", "series"]), default="window", show_default=True,
                         help="start_pos of each window: 0 (window) or its index in the series (series)."),
            click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda."),
            click.option("--out", default="runs", show_default=True, type=click.Path(file_okay=False),
                         help="root folder for run directories."),
            click.option("--quiet", "-q", is_flag=True, help="no progress bars."),
            click.option("--cache/--no-cache", default=None,
                         help="KV-cache decoding for the regressive forecast (default: wherever it is exact)."),
        ]
        if sweep:
            opts += [click.option("--archs", required=True, help="comma-separated architectures."),
                     click.option("--pes", default="none", show_default=True, help="comma-separated encodings."),
                     click.option("--seeds", default="0", show_default=True, help="comma-separated seeds."),
                     click.option("--freeze-codebook", default=None, help="comma-separated true/false.")]
        else:
            opts += [click.option("--arch", default=None,
                                  help=f"architecture (see `vqext list`; default: {DEFAULT_FORECAST_ARCH} for a --horizon "
                                       f"and backtests, else the log protocol's {DEFAULT_ARCH})."),
                     click.option("--pe", default=None,
                                  help="positional encoding (default: the architecture's recommended one, else none)."),
                     click.option("--seed", type=int, default=0, show_default=True),
                     click.option("--freeze-codebook/--train-codebook", default=None,
                                  help="keep the codebook fixed at its initialisation (the log's setting).")]
        for name, (flag, typ, text) in _HPARAM_OPTIONS.items():
            opts.append(click.option(flag, name, type=str if sweep else typ, default=None,
                                     help=text + (" Comma-separated list." if sweep else "")))
        opts.append(click.option("--hp", "hp", multiple=True, metavar="KEY=VALUE" + ("[,VALUE...]" if sweep else ""),
                                 help="any hyper-parameter the architecture declares (see `vqext list --json`), "
                                      "e.g. --hp hidden_size=32. Repeatable."
                                      + (" A comma-separated list is a grid axis." if sweep else "")))
        for o in reversed(opts):
            f = o(f)
        return _data_options(f)
    return deco


def _parse_list(text, typ, flag):
    out = []
    for item in str(text).split(","):
        item = item.strip()
        if not item:
            continue
        if typ is bool:
            if item.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise click.BadParameter(f"{item!r} is not true/false", param_hint=flag)
            out.append(item.lower() in ("true", "1", "yes"))
            continue
        try:
            out.append(typ(item))
        except ValueError:
            raise click.BadParameter(f"{item!r} is not a valid {typ.__name__}", param_hint=flag) from None
    if not out:
        raise click.BadParameter("empty list", param_hint=flag)
    return out


def _parse_hp(items, sweep: bool) -> dict:
    """``("hidden_size=32", "quantizer=hard")`` -> {"hidden_size": "32", ...}; values stay text
    until the architecture's declared defaults say their type."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key or not value.strip():
            raise click.BadParameter(f"{item!r} must look like KEY=VALUE", param_hint="--hp")
        if key in out:
            raise click.BadParameter(f"{key} given twice", param_hint="--hp")
        if key == "time_steps":
            raise click.BadParameter("the window length is --time-steps", param_hint="--hp")
        out[key] = value.strip()
    return out


# The int and float branches look alike but try different types in turn (bool, None, int, float, str).
def _hp_value(text: str, default):
    """A --hp value typed like the architecture's default for it (JSON-like when the default is None)."""
    low = text.lower()
    if isinstance(default, bool) or (default is None and low in ("true", "false")):
        if low not in ("true", "false", "1", "0", "yes", "no"):
            raise ValueError(f"{text!r} is not true/false")
        return low in ("true", "1", "yes")
    if default is None and low in ("none", "null"):
        return None
    if isinstance(default, int) or default is None:
        try:
            return int(text)
        except ValueError:
            if isinstance(default, int):
                raise ValueError(f"{text!r} is not an integer") from None
    if isinstance(default, float) or default is None:
        try:
            return float(text)
        except ValueError:
            if isinstance(default, float):
                raise ValueError(f"{text!r} is not a number") from None
    return text


def _typed_hparams(arch: str, given: dict) -> dict:
    """Hyper-parameters from the command line, typed by the architecture's declared defaults;
    names the architecture does not declare are left for ``resolve_hparams`` to reject."""
    from .registry import get_arch

    defaults = dict(getattr(get_arch(arch), "defaults", {}) or {})
    out = {}
    for name, value in given.items():
        if isinstance(value, str) and name in defaults:
            try:
                value = _hp_value(value, defaults[name])
            except ValueError as exc:
                raise click.BadParameter(f"{name}: {exc} (architecture {arch})", param_hint="--hp") from None
        out[name] = value
    return out




def _make_config(arch, pe, user_hparams, kw, seed):
    from .config import TRAINING_DEFAULTS, RunConfig, resolve_training
    from .data import default_time_steps
    from .forecasting import as_panel, direct_hparams
    from .registry import resolve_hparams

    time_steps, horizon, split = kw["time_steps"], kw["horizon"] or 0, kw["split"]
    if time_steps is None or split is None:
        panel = as_panel(kw["data"], kw["column"], **_data_kwargs(kw))
        if time_steps is None:
            time_steps = default_time_steps(min(len(s.values) for s in panel))
        if split is None:
            split = "tail" if len(panel) > 1 or horizon else "random"
    user_hparams = {**_typed_hparams(arch, user_hparams), **direct_hparams(arch, horizon, kw.get("direct"))}
    resolved = resolve_hparams(arch, pe, time_steps=time_steps, **user_hparams)
    training = resolve_training(arch, **{k: kw.get(k) for k in TRAINING_DEFAULTS})
    cfg = RunConfig(arch=arch, pe=pe, hparams=resolved, user_hparams=dict(user_hparams), data=kw["data"],
                    column=kw["column"], time_steps=time_steps, seed=seed, split=split,
                    split_seed=kw["split_seed"], positions=kw["positions"], device=kw["device"],
                    val_fraction=kw["val_fraction"], val_size=kw["val_size"], normalize=kw["normalize"],
                    horizon=horizon, data_options=_data_kwargs(kw),
                    **training)
    cfg.validate()
    return cfg


def _summary_table(results):
    from .report import markdown_table

    rows = []
    for r in results:
        if "error" in r:
            rows.append([r["arch"], r["pe"], r["seed"], "failed", r["error"], "", ""])
            continue
        f = r.get("forecast") or {}
        if "regressive" not in f:  # a run over several series: no in-sample forecast errors
            rows.append([r["arch"], r["pe"], r["seed"], r["val_loss"], "-", "-", r["run"]])
            continue
        rows.append([r["arch"], r["pe"], r["seed"], r["val_loss"], f["regressive"]["mse"], f["batch"]["mse"],
                     r["run"]])
    return markdown_table(["arch", "pe", "seed", "val loss", "regressive MSE", "one-step MSE", "run"], rows)


@main.command()
@_common_training_options(sweep=False)
@click.option("--resume", "resume_dir", default=None, type=click.Path(exists=True, file_okay=False),
              help="continue an interrupted run in this directory (its config wins).")
def run(arch, pe, seed, freeze_codebook, resume_dir, quiet, out, cache, hp, **kw):
    """Train one model, evaluate, forecast, plot and print a summary.

    Writes one run directory OUT/<settings>/<timestamp>/ with config.json, metrics.jsonl,
    metrics.json, checkpoint.pt, forecast.csv and plots (PNG).

    Without --arch it trains the recommended configuration (docs/results.md): with --horizon the
    forecaster vqpatch, else the log protocol's vqformer, each with rope and its recommended
    training. Training settings not given come from the
    architecture's recommendation, else vqext's defaults (the log's training).

    \b
    Examples:
      vqext run --data ../shared/data/y+w.csv
      vqext run --arch mhvqlnmlp --pe rope
      vqext run --arch vqlnmlp --pe none --data ../shared/data/y+w.csv --epochs 50 --vocab-size 512
      vqext run --arch vqformer --pe rope --depth 2 --data synthetic:sine --epochs 5 --quiet
      vqext run --resume runs/vqlnmlp_vs512_.../2024-12-23-00-05-16
    """
    from .experiment import run_experiment

    user = _user_hparams(kw, hp, freeze_codebook)
    if resume_dir:
        cfg = _resume_config(resume_dir, dict(kw, arch=arch, pe=pe, seed=seed, out=out), user)
        if cfg is None:
            return
    else:
        if not arch:
            arch = default_arch(kw.get("horizon"))
        if pe is None:
            from .registry import get_arch

            pe = getattr(get_arch(arch), "recommended_pe", None) or "none"
        cfg = _make_config(arch, pe, user, kw, seed)
    metrics = run_experiment(cfg, out, quiet=quiet, resume_dir=resume_dir, cache="auto" if cache is None else cache,
                             announce=lambda d: click.echo(f"run directory: {d}", err=True) if not quiet else None)
    if metrics is None:
        return  # a torchrun rank other than 0: rank 0 reports
    if "series" in metrics:  # several series, trained globally
        from .report import markdown_table

        f = metrics.get("forecast")
        click.echo(markdown_table(
            ["arch", "pe", "seed", "series", "val loss", "train s", "forecast"],
            [[metrics["arch"], metrics["pe"], metrics["seed"], metrics["series"], metrics["val_loss"],
              metrics["train_seconds"], f"{f['horizon']} steps ({f['method']}): forecast.csv" if f else "-"]]))
        click.echo(f"run directory: {metrics['run']}")
        return
    click.echo(_summary_table([metrics]))
    fl = metrics["noise_floor"]
    click.echo(f"noise floor (residual variance of an order-{fl['window']} autoregression): {fl['variance']:.6g}; "
               f"one-step MSE is {metrics['forecast']['batch']['mse'] / fl['variance']:.3g}x of it"
               if fl["variance"] > 0 else "")
    click.echo(f"run directory: {metrics['run']}")


def _user_hparams(kw: dict, hp: tuple, freeze_codebook) -> dict:
    user = {k: kw[k] for k in _HPARAM_OPTIONS if kw.get(k) is not None}
    if freeze_codebook is not None:
        user["freeze_codebook"] = freeze_codebook
    for key, value in _parse_hp(hp, sweep=False).items():
        if key in user:
            raise click.BadParameter(f"{key} is also given by its own option", param_hint="--hp")
        user[key] = value
    return user


def _resume_config(resume_dir: str, values: dict, user_hparams: dict):
    """The stored configuration of the run to resume (with ``--epochs`` applied), or None when it
    is finished; options typed on the command line must agree with it."""
    from click.core import ParameterSource

    from .provenance import apply_resume_options, open_resume

    ctx = click.get_current_context()
    typed = {name for name in values
             if ctx.get_parameter_source(name) in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)}
    typed -= {"device"} | set(_HPARAM_OPTIONS)  # a run may continue on another device; hparams: below
    given = {("data" if n == "data" else n): values[n] for n in typed}
    if "out" in given:
        given["--out (a resumed run stays in its directory)"] = given.pop("out")
    cfg, done, finished = open_resume(resume_dir)
    if user_hparams:
        user_hparams = _typed_hparams(cfg.arch, user_hparams)
    cfg = apply_resume_options(cfg, given, user_hparams, done)
    if "device" in typed:
        cfg.device = values["device"]
    cfg.validate()
    if finished and done >= cfg.epochs:
        click.echo(f"run {resume_dir} is already finished ({done} of {cfg.epochs} epochs); nothing changed. "
                   "Give a larger --epochs to train it further.", err=True)
        return None
    return cfg


def _parse_also(text: str) -> dict:
    """``'archs=a,b heads=8'`` -> {"archs": "a,b", "heads": "8"} (keys as options, - or _)."""
    keys = {"archs", "pes", "seeds", "freeze_codebook", *_HPARAM_OPTIONS}
    out = {}
    for item in text.split():
        key, sep, value = item.partition("=")
        key = key.strip().lstrip("-").replace("-", "_")
        if not sep or not value:
            raise click.BadParameter(f"{item!r} must look like KEY=VALUE[,VALUE...]", param_hint="--also")
        if key not in keys:
            raise click.BadParameter(f"unknown key {key!r}; use one of {', '.join(sorted(keys))}",
                                     param_hint="--also")
        out[key] = value
    if not out:
        raise click.BadParameter("empty; give KEY=LIST pairs such as 'archs=mhvqlnmlp heads=8'", param_hint="--also")
    return out


def _grid_of(lists: dict, hp_lists: dict | None = None):
    from .sweep import build_grid

    hparams = {}
    for name, text in (hp_lists or {}).items():
        if name in _HPARAM_OPTIONS or name == "freeze_codebook":
            if lists.get(name) is not None:
                raise click.BadParameter(f"{name} is also given by its own option", param_hint="--hp")
        hparams[name] = _parse_list(text, str, f"--hp {name}")  # typed per architecture later
    for name, (flag, typ, _) in _HPARAM_OPTIONS.items():
        if lists.get(name) is not None:
            hparams[name] = _parse_list(lists[name], typ, flag)
    if lists.get("freeze_codebook") is not None:
        hparams["freeze_codebook"] = _parse_list(lists["freeze_codebook"], bool, "--freeze-codebook")
    return build_grid(_parse_list(lists["archs"], str, "--archs"), _parse_list(lists["pes"], str, "--pes"), hparams,
                      _parse_list(lists["seeds"], int, "--seeds"))


@main.command()
@_common_training_options(sweep=True)
@click.option("--jobs", "-j", type=int, default=1, show_default=True,
              help="worker processes (CPU threads are split between them).")
@click.option("--shard", default=None, metavar="I/N",
              help="run only the I-th (1-based) of N disjoint slices of the grid; merge with `vqext report`.")
@click.option("--also", "also", multiple=True, metavar="'KEY=LIST ...'",
              help="add another grid: the command's lists with these replaced, e.g. "
                   "--also 'archs=mhvqlnmlp pes=sinpe,rope heads=8'. Repeatable; runs in the same worker pool.")
def sweep(archs, pes, seeds, freeze_codebook, jobs, shard, also, quiet, out, cache, hp, **kw):
    """Train a grid of configurations and write a results table (markdown + CSV).

    Every architecture x encoding x hyper-parameter value x seed is one run. The table is sorted by
    validation loss; with several seeds it adds median, mean, spread and worst seed. Each --also
    adds a grid that replaces some of the lists (a union of grids, one worker pool); the longest
    runs start first.

    \b
    Examples:
      vqext sweep --archs vqlnmlp,mhvqlnmlp --pes none,randn,sinpe,rope --epochs 20
      vqext sweep --archs mhvqlnmlp --pes none,rope --heads 2,8 --seeds 0,1,2 --jobs 2
      vqext sweep --archs vqlnmlp --pes none,rope --also 'archs=mhvqlnmlp heads=2,8' --jobs 2
      vqext sweep --archs vqformer --pes rope --depth 1,2 --shard 1/2 --out runs/grid
      vqext sweep --archs vqformer --pes rope --depth 1,2 --shard 2/2 --out runs/grid
      vqext report runs/grid
    """
    import datetime as dt

    from .io import reserve_name
    from .report import write_report
    from .sweep import parse_shard, run_sweep, shard as take_shard

    if jobs < 1:
        raise click.BadParameter("must be at least 1", param_hint="--jobs")
    shard_i, shard_n = parse_shard(shard)
    base = {"archs": archs, "pes": pes, "seeds": seeds, "freeze_codebook": freeze_codebook}
    base.update({name: kw.get(name) for name in _HPARAM_OPTIONS})
    hp_lists = _parse_hp(hp, sweep=True)
    grid = []
    for overrides in [{}] + [_parse_also(text) for text in also]:
        for point in _grid_of({**base, **overrides}, hp_lists):
            if point not in grid:  # grids may overlap: each configuration runs once
                grid.append(point)
    # Every combination is validated before anything trains.
    configs = [_make_config(p.arch, p.pe, p.user_hparams, kw, p.seed) for p in grid]
    mine = take_shard(configs, shard_i, shard_n)
    if not mine:
        click.echo(f"shard {shard_i}/{shard_n} of a {len(configs)}-run grid is empty; nothing to do")
        return
    stamp = dt.datetime.now().strftime("%Y-%m-%d-%H-%M-%S")
    suffix = f"-shard{shard_i}of{shard_n}" if shard_n > 1 else ""
    if not quiet:
        click.echo(f"sweep: {len(mine)} of {len(configs)} runs (shard {shard_i}/{shard_n}), {jobs} job(s)")
    results, stopped_by = run_sweep(mine, out, jobs=jobs, quiet=quiet, cache="auto" if cache is None else cache,
                                    echo=click.echo)
    ok = [r for r in results if r is not None and "error" not in r]
    finished = [r for r in results if r is not None]
    click.echo(_summary_table(finished))
    if ok:
        stem = reserve_name(out, f"sweep-{stamp}{suffix}", ".md")  # one table per invocation
        tables = write_report(ok, out, stem=stem, title=f"Sweep {stamp}{suffix}"
                              + (f" (stopped: {len(finished)} of {len(results)} runs)" if stopped_by else ""))
        click.echo("")
        click.echo(tables.markdown)
        click.echo(f"results: {os.path.join(out, stem + '.md')} and .csv")
    if stopped_by:
        click.echo(f"vqext: sweep stopped by {stopped_by.name}: {len(finished)} of {len(results)} runs finished",
                   err=True)
        sys.exit(128 + int(stopped_by))
    failed = len(finished) - len(ok)
    if failed:
        raise click.ClickException(f"{failed} of {len(finished)} runs failed (see the table above)")


@main.command()
@click.option("--run", "run_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="a run directory written by `vqext run`.")
@click.option("--data", required=True, metavar="CSV", help="series to forecast (CSV, bundled:NAME, synthetic:NAME).")
@click.option("--column", default=None, help="CSV column name or index (default: last numeric).")
@click.option("--horizon", type=int, default=None,
              help="steps to forecast (--origin end: default the run's --horizon; --origin start: default to the "
                   "end of the series). At most 100 window lengths.")
@click.option("--origin", type=click.Choice(["end", "start"]), default="end", show_default=True,
              help="end: the points after the end of every series; start: the log's protocol, rolling from the "
                   "first T points over the series.")
@click.option("--normalize", type=click.Choice(["train", "series"]), default=None,
              help="train: the run's saved statistics of each series (a series it never saw: its own history; "
                   "default at --origin end); series: the series' own (default at --origin start, the log's).")
@click.option("--direct/--rollout", "direct", default=None,
              help="the model's direct multi-step head, or the one-step rollout (default: what the run trained).")
@click.option("--cache/--no-cache", default=None,
              help="decode the rollout with the KV cache (default: --origin end wherever it is exact; "
                   "--origin start never).")
@click.option("--out", default=None, type=click.Path(file_okay=False),
              help="where to write (default: RUN/forecasts/<data>).")
@click.option("--quiet", "-q", is_flag=True, help="no progress bar.")
@_data_options
def forecast(run_dir, data, column, horizon, origin, normalize, direct, cache, out, quiet, **data_kw):
    """Forecast with a trained run: the future of every series (default), or the log's in-sample rollout.

    --origin end writes forecast.csv (unique_id, step, ds, y_hat: the points after each series'
    end; ds continues the series' timestamps, or its integer index), forecast.png (up to 12
    series with their history) and metrics.json. --origin start writes the log's files:
    forecast.csv (index, truth, one_step, regressive), metrics.json and the two plots.

    \b
    Examples:
      vqext forecast --run runs/vqformer_rope_.../... --data bundled:airline --horizon 24
      vqext forecast --run runs/vqformer_rope_.../... --data ../shared/data/w+y.csv --horizon 48 --rollout
      vqext forecast --run runs/mhvqlnmlp_rope_.../2024-12-23-00-04-22 --data ../shared/data/w+y.csv --origin start
    """
    from .report import markdown_table

    if horizon is not None and horizon < 1:
        raise click.BadParameter("must be at least 1", param_hint="--horizon")
    note = lambda t: click.echo(t, err=True)  # noqa: E731
    if origin == "end":
        from .experiment import forecast_future_run

        summary, out = forecast_future_run(run_dir, data, column, horizon, normalize=normalize or "train",
                                           direct=direct, cache="auto" if cache is None else cache, out=out,
                                           progress=not quiet, data_options=_data_kwargs(data_kw))
        click.echo(markdown_table(["series", "steps", "method", "normalize", "seconds"],
                                  [[summary["series"], summary["horizon"], summary["method"], summary["normalize"],
                                    summary["seconds"]]]))
        click.echo(f"written to {out}")
        return
    if direct:
        raise click.BadParameter("--origin start rolls one step at a time; drop --direct", param_hint="--direct")
    from .experiment import forecast_run

    metrics, out = forecast_run(run_dir, data, column, horizon, bool(cache), out, note=note,
                                normalize=normalize or "series", data_options=_data_kwargs(data_kw))
    b, r = metrics["batch"], metrics["regressive"]
    click.echo(markdown_table(["forecast", "steps", "MSE", "MAE"],
                              [["one-step (batch)", b["points"], b["mse"], b["mae"]],
                               [f"regressive{' (cached)' if metrics['cache'] else ''}", metrics["horizon"],
                                r["mse"], r["mae"]]]))
    click.echo(f"written to {out}")


@main.command()
@click.argument("dirs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--out", default=None, type=click.Path(file_okay=False),
              help="where to write report.md/.csv/.png (default: the first DIR).")
def report(dirs, out):
    """Tabulate and plot finished runs found under DIRS (merges sweep shards).

    Errors are shown next to a noise-floor estimate: the residual variance of a least-squares
    autoregression on the series (the one-step error left once the predictable part is gone).

    \b
    Examples:
      vqext report runs
      vqext report /scratch/shard1 /scratch/shard2 --out results
    """
    from .report import find_runs, write_report

    runs, notes = find_runs(list(dirs))
    for text in notes:
        click.echo(f"note: {text}", err=True)
    if not runs:
        raise click.ClickException(f"no finished runs (with metrics.json) under {', '.join(dirs)}")
    out = out or dirs[0]
    tables = write_report(runs, out, stem="report", title="Report")
    click.echo(tables.markdown)
    click.echo(f"written: {os.path.join(out, 'report.md')}, report.csv, report_loss.png, report_noise_floor.png")


# ------------------------------------------------------------------------------------ backtest
MODEL_NAME = "vqext"


def model_forecaster(arch, pe, seed, freeze_codebook, quiet, kw):
    """A factory of the vqext forecaster that the run options describe, and a label for it."""
    arch = arch or DEFAULT_FORECAST_ARCH
    if pe is None:
        from .registry import get_arch

        pe = getattr(get_arch(arch), "recommended_pe", None) or "none"
    user = _user_hparams(kw, kw.get("hp") or (), freeze_codebook)
    cfg = _make_config(arch, pe, user, kw, seed)
    from .backtest import VqextForecaster

    label = f"{MODEL_NAME} = {arch}/{pe}, seed {seed}, {cfg.epochs} epochs"
    return (lambda: VqextForecaster(cfg, quiet=quiet)), label


def _horizon_option(f):
    """``--horizon`` unless the run options already have it (then the backtest's H is the run's H)."""
    if any(p.name == "horizon" for p in run.params):
        return f
    return click.option("--horizon", type=int, default=None, help="points forecast from each origin.")(f)


@main.command()
@_common_training_options(sweep=False)
@_horizon_option
@click.option("--windows", "-K", type=int, default=1, show_default=True, help="forecast origins per series.")
@click.option("--step", "-S", type=int, default=None, help="points between origins (default: the horizon).")
@click.option("--season", "-m", type=int, default=None,
              help="season length: MASE's seasonal-naive scale, the baselines' season and OWA's Naive2 "
                   "(default: 1, and no OWA).")
@click.option("--refit/--no-refit", default=False, show_default=True,
              help="train the vqext model again at every origin, or once before the first origin.")
@click.option("--baselines", "baselines_spec", default=None, metavar="LIST",
              help="comma-separated baselines, or none (default: every available one: naive, snaive, AutoETS, "
                   "AutoTheta, AutoARIMA with vqext[baselines], NHITS with vqext[neural], and plugins').")
@click.option("--model/--no-model", "with_model", default=True, show_default=True,
              help="include the vqext model (--no-model: baselines only).")
@click.option("--pretrained", "pretrained", default=None, type=click.Path(exists=True, file_okay=False),
              help="a finished run directory: its model forecasts every window without training on this data "
                   "(zero-shot); each series is scaled with its own history.")
def backtest(arch, pe, seed, freeze_codebook, quiet, out, cache, windows, step, season, refit,
             baselines_spec, with_model, pretrained, **kw):
    """Rolling-origin evaluation of a vqext model against the baselines, on the same windows.

    Window k of K forecasts the H points after origin n - H - (K-1-k)*S of each series (the last
    window ends at the end of the data). Every model sees only the points before each origin.
    Writes OUT/backtest_<data>/<timestamp>/ with backtest.md, summary.csv, per_series.csv,
    per_window.csv, forecasts.csv, errors_by_window.png and forecasts.png.

    \b
    Examples:
      vqext backtest --data bundled:airline --horizon 12 --windows 3 --season 12
      vqext backtest --data bundled:airline --horizon 12 -K 4 -S 6 -m 12 --refit --epochs 20
      vqext backtest --data bundled:nile --horizon 10 -K 3 --no-model --baselines naive,AutoTheta
      vqext backtest --data bundled:airline --horizon 24 -m 12 --pretrained runs/m4/RUN
    """
    from . import backtest as B
    from . import backtest_report as R
    from . import baselines as BL
    from .config import new_run_dir

    horizon = kw.get("horizon")
    if not horizon or horizon < 1:
        raise click.BadParameter("give the points to forecast from each origin (at least 1)", param_hint="--horizon")
    frame, name = B.load_frame(kw["data"], kw["column"], **_data_kwargs(kw))
    names, note = BL.resolve_baselines(baselines_spec)
    if note and not quiet:
        click.echo(f"note: {note}", err=True)
    m = season or 1
    forecasters = {}
    label = None
    if with_model and pretrained:
        given = [flag for flag, value in (("--arch", arch), ("--pe", pe), ("--refit", refit or None)) if value]
        if given:
            raise click.BadParameter(f"{', '.join(given)} describe a model to train; --pretrained uses a trained one",
                                     param_hint="--pretrained")
        model = B.PretrainedForecaster(pretrained)  # loaded once: a bad run directory fails here
        forecasters[MODEL_NAME] = lambda: model
        label = f"{MODEL_NAME} = {model.fitted.cfg.arch}/{model.fitted.cfg.pe} from {pretrained}, zero-shot"
    elif with_model:
        factory, label = model_forecaster(arch, pe, seed, freeze_codebook, quiet, kw)
        forecasters[MODEL_NAME] = factory
    for b in names:
        forecasters[b] = lambda b=b: BL.make_baseline(b, m)
    if not forecasters:
        raise click.UsageError("nothing to evaluate: --no-model and no baselines")
    # Checked before the output folder exists, so bad settings leave nothing behind.
    B.check_windows(dict(frame.groupby("unique_id", sort=False).size()), horizon, windows,
                    horizon if step is None else step, m)
    progress = None if quiet else (lambda text: click.echo(text, err=True))
    result = B.run_backtest(frame, forecasters, horizon=horizon, windows=windows, step=step, season=m, refit=refit,
                            progress=progress)
    out_dir = new_run_dir(out, f"backtest_{name}")
    title = f"Backtest on {name}" + (f" ({label})" if label else "")
    paths = R.write(result, out_dir, title=title, with_owa=season is not None)
    with open(paths["backtest.md"], encoding="utf-8") as fh:
        click.echo(fh.read().rstrip())
    click.echo(f"written to {out_dir}")


if __name__ == "__main__":
    main()
