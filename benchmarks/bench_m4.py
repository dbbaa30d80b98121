"""M4 accuracy: vqext's default model, trained globally, against the statsforecast baselines.

Without ``--test`` (validation): the last horizon of each training series is held out and
forecast from the points before it; the only split to tune on. With ``--test``: every training
series is forecast and scored against the official test file (the same M4 format, one row per
series with exactly one horizon of values).

vqext's model is the recommended forecaster with the frequency's recipe (``RECIPES``: Hourly uses
a 168-step window and the weekly seasonal anchor) unless ``--model-args`` says otherwise; with several
``--seeds`` the row ``vqext`` is the median of the seeds' scores and ``vqext[median of seeds]``
scores the point-wise median of their forecasts (an ensemble). All models forecast the same series
from the same origins in the same run; sMAPE (M4, percent),
MASE (in-sample seasonal-naive scale) and OWA (relative to M4's Naive2) aggregate over series as
M4 does. Wall and CPU seconds are per model (fit + forecast, this process; statsforecast's
one-off compilation is done before the clock starts).

    python benchmarks/bench_m4.py --train ../shared/data/m4/Hourly-train.csv [--test PATH] [--json OUT]
        [--series N] [--seeds 0,1,2] [--baselines naive,snaive,AutoETS,AutoTheta,AutoARIMA | none]
        [--no-model] [--model-args '--epochs 5'] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time

import numpy as np
import pandas as pd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from vqext import backtest as B  # noqa: E402
from vqext import baselines as BL  # noqa: E402
from vqext.errors import VqextError  # noqa: E402

# M4's horizons and the seasons its MASE uses, by frequency.
FREQUENCIES = {"Hourly": (48, 24), "Daily": (14, 1), "Weekly": (13, 1), "Monthly": (18, 12),
               "Quarterly": (8, 4), "Yearly": (6, 1)}
# vqext's recipe per frequency, on top of the recommended forecaster (vqpatch), chosen on the
# validation split (docs/results.md). Hourly: a week of context, and forecasts that start from
# the same hours a week earlier (the seasonal naive of the weekly cycle) plus what the model learns.
RECIPES = {"Hourly": {"time_steps": 168, "hp": {"anchor": "season", "season": 168}}}
MODEL = "vqext"
ENSEMBLE = "vqext[median of seeds]"
KEYS = ("smape", "mase", "owa", "seconds", "cpu_seconds")


def infer_frequency(path: str) -> str:
    stem = os.path.basename(path).lower()
    for name in FREQUENCIES:
        if stem.startswith(name.lower()):
            return name
    raise SystemExit(f"bench_m4: cannot tell the frequency from {path!r}; give --frequency "
                     f"({', '.join(FREQUENCIES)})")


def read_m4(path: str) -> pd.DataFrame:
    """An M4 file (id, then values; shorter rows padded with empty cells) as ``unique_id, ds, y``."""
    from vqext import data as D

    if hasattr(D, "load_panel"):
        return D.load_panel(path, format="m4").to_frame()
    wide = pd.read_csv(path, dtype={0: str})
    long = wide.melt(id_vars=wide.columns[0], var_name="col", value_name="y").dropna(subset=["y"])
    long["ds"] = long["col"].str.lstrip("V").astype(int) - 2  # V2 is the first value
    long = long.rename(columns={wide.columns[0]: "unique_id"})
    order = {u: i for i, u in enumerate(wide.iloc[:, 0])}
    long = long.sort_values(["unique_id", "ds"], key=lambda c: c.map(order) if c.name == "unique_id" else c)
    return long[["unique_id", "ds", "y"]].reset_index(drop=True)


def with_test(train: pd.DataFrame, test: pd.DataFrame, horizon: int, path: str) -> pd.DataFrame:
    """Training series followed by their test points (scored as one window that starts at the end
    of each training series)."""
    counts = test.groupby("unique_id").size()
    missing = sorted(set(train.unique_id) - set(counts.index))
    if missing:
        raise SystemExit(f"bench_m4: {path} has no row for {len(missing)} training series (first: {missing[0]})")
    wrong = counts[counts != horizon]
    if len(wrong):
        raise SystemExit(f"bench_m4: {path}: series {wrong.index[0]} has {wrong.iloc[0]} test values, "
                         f"expected the horizon {horizon}")
    lengths = train.groupby("unique_id").size()
    test = test[test.unique_id.isin(lengths.index)].copy()
    test["ds"] = test.ds + test.unique_id.map(lengths)
    both = pd.concat([train, test], ignore_index=True)
    order = {u: i for i, u in enumerate(pd.unique(train.unique_id))}
    return both.sort_values(["unique_id", "ds"], key=lambda c: c.map(order) if c.name == "unique_id" else c,
                            ignore_index=True)


def with_recipe(frequency: str, model_args: str) -> str:
    """``model_args`` with the frequency's recipe added where they leave it open. The recipe is for
    the recommended architecture: an ``--arch`` other than vqpatch gets none, and a window or
    hyper-parameter given in ``model_args`` wins over the recipe's."""
    recipe = RECIPES.get(frequency)
    tokens = shlex.split(model_args)
    arch = next((tokens[i + 1] for i, t in enumerate(tokens[:-1]) if t == "--arch"), None)
    arch = arch or next((t.split("=", 1)[1] for t in tokens if t.startswith("--arch=")), None)
    if recipe is None or arch not in (None, "vqpatch"):
        return model_args
    added = []
    if not any(t in ("-T", "--time-steps") or t.startswith("--time-steps=") for t in tokens):
        added += ["-T", str(recipe["time_steps"])]
    given = {tokens[i + 1].split("=", 1)[0] for i, t in enumerate(tokens[:-1]) if t == "--hp"}
    for key, value in recipe["hp"].items():
        if key not in given:
            added += ["--hp", f"{key}={value}"]
    return shlex.join(added + tokens)


def model_factories(train_path: str, horizon: int, seeds: list[int], model_args: str, quiet: bool) -> dict:
    """One vqext forecaster per seed, configured as `vqext backtest` would be with ``model_args``."""
    from vqext.cli import backtest, model_forecaster

    out = {}
    for seed in seeds:
        argv = ["--horizon", str(horizon), "--data", train_path, "--seed", str(seed)] + shlex.split(model_args)
        params = backtest.make_context("bench_m4", argv).params
        keys = ("arch", "pe", "seed", "freeze_codebook", "quiet")
        factory, _ = model_forecaster(*(params.pop(k) for k in keys[:4]), quiet, params)
        out[f"{MODEL}[seed {seed}]" if len(seeds) > 1 else MODEL] = factory
    return out


def summarise(result: B.BacktestResult) -> dict:
    summary = result.summary().set_index("model")
    models = {m: {"smape": float(r.smape), "mase": float(r.mase), "owa": float(r.owa), "seconds": float(r.seconds),
                  "cpu_seconds": float(r.cpu_seconds)} for m, r in summary.iterrows()}
    seeded = [m for m in models if m.startswith(MODEL + "[seed")]
    if seeded:  # several seeds: "vqext" is their median, each seed is kept too
        models = {MODEL: {k: statistics.median(models[m][k] for m in seeded) for k in KEYS}, **models}
    return models


def naive2_reference(result: B.BacktestResult) -> dict:
    from vqext import metrics as M

    first = result.models[0]
    part = result.scores[result.scores.model == first]
    agg = M.aggregate(M.Score(*(r[f] for f in M.Score.__dataclass_fields__)) for _, r in part.iterrows())
    return {"smape": agg["naive2_smape"], "mase": agg["naive2_mase"], "owa": 1.0}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train", required=True, help="M4 training file, e.g. ../shared/data/m4/Hourly-train.csv")
    ap.add_argument("--test", default=None, help="the official M4 test file of the same frequency")
    ap.add_argument("--json", default=None, help="write the results as JSON here")
    ap.add_argument("--frequency", choices=sorted(FREQUENCIES), default=None,
                    help="horizon and season (default: from the file name)")
    ap.add_argument("--series", type=int, default=None, help="only the first N series (a quick subset)")
    ap.add_argument("--seeds", default="0", help="comma-separated seeds of the vqext model (median reported)")
    ap.add_argument("--baselines", default=None, help="comma-separated baselines, or none (default: all available)")
    ap.add_argument("--no-model", action="store_true", help="baselines only")
    ap.add_argument("--model-args", default="", help="vqext run options for the model, e.g. '--epochs 5'")
    ap.add_argument("--out", default=None, help="also write the backtest tables and plots into this folder")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)

    frequency = args.frequency or infer_frequency(args.train)
    horizon, season = FREQUENCIES[frequency]
    started = time.perf_counter()
    frame = read_m4(args.train)
    if args.series is not None:
        if args.series < 1:
            raise SystemExit("bench_m4: --series must be at least 1")
        keep = pd.unique(frame.unique_id)[:args.series]
        frame = frame[frame.unique_id.isin(keep)]
    load_seconds = time.perf_counter() - started
    mode = "validation (last horizon of each training series held out)"
    if args.test:
        frame = with_test(frame, read_m4(args.test), horizon, args.test)
        mode = f"test ({args.test})"
    names, note = BL.resolve_baselines(args.baselines)
    if note:
        print(f"note: {note}", file=sys.stderr)
    model_args = with_recipe(frequency, args.model_args)
    forecasters = {} if args.no_model else model_factories(
        args.train, horizon, [int(s) for s in args.seeds.split(",") if s.strip()], model_args, args.quiet)
    for name in names:
        forecasters[name] = lambda name=name: BL.make_baseline(name, season)
    if not forecasters:
        raise SystemExit("bench_m4: nothing to run (--no-model and no baselines)")
    progress = None if args.quiet else (lambda text: print(text, file=sys.stderr, flush=True))
    result = B.run_backtest(frame, forecasters, horizon=horizon, windows=1, season=season, progress=progress)
    seeds = [m for m in result.models if m.startswith(MODEL + "[seed")]
    if len(seeds) > 1:  # the seeds' forecasts combined: what an ensemble of them would score
        result = B.combine(result, ENSEMBLE, seeds)
    models = summarise(result)
    reference = naive2_reference(result)

    n = frame.unique_id.nunique()
    print(f"M4 {frequency}: {n} series, horizon {horizon}, season {season}, {mode}; loaded in {load_seconds:.1f} s")
    if not args.no_model:
        print(f"vqext: the recommended forecaster with {model_args or 'its defaults'}")
    print(f"{'model':<18} {'sMAPE':>8} {'MASE':>8} {'OWA':>7} {'seconds':>9} {'CPU s':>9}")
    for name, r in models.items():
        print(f"{name:<18} {r['smape']:8.3f} {r['mase']:8.3f} {r['owa']:7.3f} {r['seconds']:9.1f} "
              f"{r['cpu_seconds']:9.1f}")
    print(f"{'Naive2 (reference)':<18} {reference['smape']:8.3f} {reference['mase']:8.3f} {1.0:7.3f}")
    if args.out:
        from vqext import backtest_report as R

        R.write(result, args.out, title=f"M4 {frequency}, {mode}")
    if args.json:
        from vqext.io import atomic_write_json

        atomic_write_json(args.json, {
            "frequency": frequency, "horizon": horizon, "season": season, "series": n, "mode": mode,
            "train": args.train, "test": args.test, "load_seconds": load_seconds, "naive2": reference,
            "model_args": None if args.no_model else model_args,
            "machine": f"{platform.machine()}, {os.cpu_count()} cores", "models": models})
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except VqextError as exc:
        print(f"bench_m4: {exc}", file=sys.stderr)
        sys.exit(1)
