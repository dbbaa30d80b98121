"""Sweeps (grids of runs, optionally sharded and in parallel) and reports over run directories."""
from __future__ import annotations

import csv
import io
import itertools
import math
import os
import statistics
from dataclasses import dataclass, field

from . import config as C
from .errors import ConfigError

PE_TITLES = {"none": "Original", "randn": "+RandnPE", "sinpe": "+SinPE", "rope": "+RoPE"}


# ----------------------------------------------------------------------------------- the grid
@dataclass(frozen=True)
class GridPoint:
    arch: str
    pe: str
    hparams: tuple  # sorted (name, value) pairs the user set
    seed: int

    @property
    def user_hparams(self) -> dict:
        return dict(self.hparams)


def build_grid(archs, pes, hparam_lists: dict, seeds) -> list[GridPoint]:
    """Cartesian product in a fixed order (archs, pes, hparams in name order, seeds)."""
    names = sorted(hparam_lists)
    grid = []
    for arch, pe, *vals in itertools.product(archs, pes, *(hparam_lists[n] for n in names)):
        for seed in seeds:
            grid.append(GridPoint(arch, pe, tuple(zip(names, vals[:len(names)])), int(seed)))
    return grid


def parse_shard(text: str | None) -> tuple[int, int]:
    """``"I/N"`` -> (I, N), 1 <= I <= N. ``None`` -> (1, 1)."""
    if not text:
        return 1, 1
    try:
        i, n = (int(p) for p in text.split("/"))
    except ValueError:
        raise ConfigError(f"--shard must look like I/N (e.g. 2/4), got {text!r}") from None
    if n < 1 or not 1 <= i <= n:
        raise ConfigError(f"--shard {text}: need 1 <= I <= N (shards are numbered from 1)")
    return i, n


def shard(grid: list, index: int, count: int) -> list:
    """The index-th (1-based) of ``count`` disjoint slices; together they cover the grid."""
    return grid[index - 1::count]


# ------------------------------------------------------------------------------ sweep running
def _worker_init(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def _run_point(cfg_dict: dict, out_root: str, cache: bool) -> dict:
    from .train import run_experiment

    try:
        return run_experiment(C.RunConfig.from_dict(cfg_dict), out_root, quiet=True, cache=cache)
    except Exception as exc:  # noqa: BLE001 - one failed configuration must not end the sweep
        return {"error": f"{type(exc).__name__}: {exc}", "arch": cfg_dict["arch"], "pe": cfg_dict["pe"],
                "seed": cfg_dict["seed"], "hparams": cfg_dict["hparams"]}


def estimated_cost(cfg: C.RunConfig) -> float:
    """A rough relative training cost, for scheduling only: the codebook attention's work per window
    (narrow heads cost extra per score), times depth, windows and epochs."""
    hp = cfg.hparams
    heads, width = int(hp.get("heads", 1) or 1), int(hp.get("d_model", 64) or 64)
    per_score = width / heads + 8.0  # head size plus the exp and bookkeeping of each score
    return cfg.epochs * cfg.time_steps * int(hp.get("vocab_size", 64) or 64) * heads * per_score * int(hp.get("depth", 1) or 1)


def run_sweep(configs: list[C.RunConfig], out_root: str, *, jobs: int = 1, quiet: bool = False,
              cache: bool = False, echo=print) -> list[dict]:
    """Run every config (``jobs`` worker processes, CPU threads split between them)."""
    results = []
    if jobs <= 1:
        for n, cfg in enumerate(configs, 1):
            if not quiet:
                echo(f"[{n}/{len(configs)}] {cfg.arch} {cfg.pe} seed {cfg.seed} {cfg.user_hparams or ''}")
            results.append(_run_point(cfg.to_dict(), out_root, cache))
        return results
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    threads = max(1, (os.cpu_count() or 1) // jobs)
    ctx = mp.get_context("spawn")  # fork after torch has started its thread pools can deadlock
    # Longest first (a greedy schedule): a long run started last would leave the other workers idle.
    order = sorted(range(len(configs)), key=lambda i: -estimated_cost(configs[i]))
    with ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_worker_init, initargs=(threads,)) as pool:
        futures = {pool.submit(_run_point, configs[i].to_dict(), out_root, cache): i for i in order}
        done: dict[int, dict] = {}
        for n, fut in enumerate(as_completed(futures), 1):
            i = futures[fut]
            done[i] = fut.result()
            if not quiet:
                r = done[i]
                status = r.get("error") or f"val loss {r['val_loss']:.6g}"
                echo(f"[{n}/{len(configs)}] {configs[i].arch} {configs[i].pe} seed {configs[i].seed}: {status}")
    return [done[i] for i in range(len(configs))]


# ------------------------------------------------------------------------------------ reports
def find_runs(paths: list[str]) -> tuple[list[dict], list[str]]:
    """Metrics of every finished run under ``paths`` (run dirs or folders of them), and skipped dirs."""
    runs, skipped, seen = [], [], set()
    for root in paths:
        if not os.path.exists(root):
            raise ConfigError(f"no such directory: {root}")
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            if C.CONFIG_FILE not in filenames:
                continue
            real = os.path.realpath(dirpath)
            if real in seen:
                continue
            seen.add(real)
            if C.METRICS_FILE not in filenames:
                skipped.append(dirpath)
                continue
            m = C.read_json(os.path.join(dirpath, C.METRICS_FILE), "run metrics")
            _check_metrics(m, os.path.join(dirpath, C.METRICS_FILE))
            m["run"] = dirpath
            m["other_forecasts"] = _other_forecasts(dirpath)
            runs.append(m)
    return runs, skipped


def _check_metrics(m, path: str) -> None:
    """A metrics.json that parses but is not what `vqext run` writes is reported, not tabulated."""
    from .errors import DataError

    def number(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    fc = m.get("forecast") if isinstance(m, dict) else None
    problems = []
    if not isinstance(m, dict):
        problems.append(f"a JSON {type(m).__name__}, not an object")
    else:
        problems += [f"{k!r} missing" for k in ("arch", "pe", "seed", "hparams", "data") if k not in m]
        problems += [f"{k!r} is not a number" for k in ("val_loss", "best_val_loss") if not number(m.get(k))]
        if not (isinstance(fc, dict) and all(isinstance(fc.get(p), dict) and number(fc[p].get("mse"))
                                             and number(fc[p].get("mae")) for p in ("batch", "regressive"))):
            problems.append("'forecast' lacks batch/regressive mse and mae")
        nf = m.get("noise_floor")
        if not (isinstance(nf, dict) and number(nf.get("variance")) and "window" in nf):
            problems.append("'noise_floor' lacks variance/window")
    if problems:
        raise DataError(f"run metrics {path} is not a vqext metrics file: {'; '.join(problems)}")


def _other_forecasts(run_dir: str) -> dict:
    """``vqext forecast`` results kept in ``RUN/forecasts/<series>/metrics.json``, by series name."""
    found = {}
    root = os.path.join(run_dir, "forecasts")
    if os.path.isdir(root):
        for name in sorted(os.listdir(root)):
            path = os.path.join(root, name, C.METRICS_FILE)
            if os.path.isfile(path):
                found[name] = C.read_json(path, "forecast metrics")
    return found


def run_name(m: dict) -> str:
    """``label/timestamp`` like the seed's File column."""
    parts = os.path.normpath(m["run"]).split(os.sep)
    return "/".join(parts[-2:])


def config_key(m: dict) -> str:
    """A run's configuration without its seed (runs that differ only in seed aggregate)."""
    label = os.path.normpath(m["run"]).split(os.sep)[-2]
    return label.rsplit("_s", 1)[0] if f"_s{m.get('seed')}" in label else label


def markdown_table(header: list[str], rows: list[list], align: str | None = None) -> str:
    cells = [[str(c) for c in header]] + [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(r[j]) for r in cells) for j in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(cells[0], widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in cells[1:]]
    return "\n".join(lines)


def _fmt(v) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.6g}"
    return str(v)


@dataclass
class Tables:
    runs: list[dict]
    markdown: str
    csv: str
    aggregated: list[dict] = field(default_factory=list)


def _noise_ratio(m: dict, kind: str = "batch") -> float:
    var = m.get("noise_floor", {}).get("variance", float("nan"))
    mse = m["forecast"][kind]["mse"]
    return mse / var if var and var > 0 else float("nan")


def _worst_over_median(values: list[float]) -> float:
    med = statistics.median(values)
    return max(values) / med if med > 0 else float("nan")


def _other_mse(m: dict, name: str) -> float:
    f = m.get("other_forecasts", {}).get(name)
    return float(f["regressive"]["mse"]) if f else float("nan")


def build_tables(runs: list[dict], title: str = "Results") -> Tables:
    runs = sorted(runs, key=lambda m: (m["val_loss"], run_name(m)))
    md = [f"# {title}", "", f"{len(runs)} runs, sorted by validation loss (normalised MSE on the validation windows).", ""]
    others = sorted({name for m in runs for name in m.get("other_forecasts", {})})
    header = (["File", "Loss", "Regressive MSE", "Regressive MAE", "One-step MSE", "One-step MSE / noise floor",
               "Regressive MSE / noise floor"] + [f"Regressive MSE on {name}" for name in others])
    md.append(markdown_table(header, [[run_name(m), m["val_loss"], m["forecast"]["regressive"]["mse"],
                                       m["forecast"]["regressive"]["mae"], m["forecast"]["batch"]["mse"],
                                       _noise_ratio(m), _noise_ratio(m, "regressive")]
                                      + [_other_mse(m, name) for name in others] for m in runs]))
    if others:
        md += ["", "Regressive MSE on another series: `vqext forecast --run RUN --data CSV` (normalised with "
               "that series' own statistics), kept in RUN/forecasts/<series>/."]
    floors = {(m["data"], m["noise_floor"]["window"], round(m["noise_floor"]["variance"], 6)) for m in runs}
    md += ["", "Noise floor: variance of the series around its centred moving average "
           "(errors below it are not meaningful; an MSE ratio near 1 is as good as it gets, and "
           "ratio - 1 is roughly what is left to gain):"]
    md += [f"- {d}: moving average of {w} points, variance {v:.6g}" for d, w, v in sorted(floors)]

    groups: dict[str, list[dict]] = {}
    for m in runs:
        groups.setdefault(config_key(m), []).append(m)
    aggregated = []
    for key, ms in groups.items():
        losses = [m["val_loss"] for m in ms]
        reg = [m["forecast"]["regressive"]["mse"] for m in ms]
        row = {"config": key, "arch": ms[0]["arch"], "pe": ms[0]["pe"], "seeds": len(ms),
               "median": statistics.median(losses), "mean": statistics.fmean(losses),
               "spread": statistics.stdev(losses) if len(ms) > 1 else 0.0, "worst": max(losses),
               "worst_seed": ms[losses.index(max(losses))].get("seed"),
               "regressive_median": statistics.median(reg), "regressive_mean": statistics.fmean(reg),
               "regressive_spread": statistics.stdev(reg) if len(ms) > 1 else 0.0,
               "regressive_worst": max(reg), "regressive_worst_seed": ms[reg.index(max(reg))].get("seed"),
               "regressive_worst_over_median": _worst_over_median(reg),
               "regressive_median_over_floor": statistics.median(_noise_ratio(m, "regressive") for m in ms),
               "train_seconds_median": statistics.median(float(m.get("train_seconds") or 0.0) for m in ms)}
        for name in others:
            vals = [v for v in (_other_mse(m, name) for m in ms) if isinstance(v, float) and not math.isnan(v)]
            row[f"{name}_median"] = statistics.median(vals) if vals else float("nan")
            row[f"{name}_worst"] = max(vals) if vals else float("nan")
        aggregated.append(row)
    aggregated.sort(key=lambda a: (a["median"], a["config"]))
    if any(a["seeds"] > 1 for a in aggregated):
        md += ["", "## Across seeds", "",
               "Median, mean, spread (std) and worst seed of the validation loss and the regressive MSE; "
               "worst / median says how much a bad seed costs.", "",
               markdown_table(["Config", "Seeds", "Median loss", "Mean loss", "Spread (std)", "Worst loss (seed)",
                               "Median regressive MSE", "Mean regressive MSE", "Regressive spread (std)",
                               "Worst regressive MSE (seed)", "Worst / median", "Median regressive / noise floor",
                               "Median train s"]
                              + [f"{name}: median / worst regressive MSE" for name in others],
                              [[a["config"], a["seeds"], a["median"], a["mean"], a["spread"],
                                f"{_fmt(a['worst'])} ({a['worst_seed']})", a["regressive_median"],
                                a["regressive_mean"], a["regressive_spread"],
                                f"{_fmt(a['regressive_worst'])} ({a['regressive_worst_seed']})",
                                a["regressive_worst_over_median"], a["regressive_median_over_floor"],
                                a["train_seconds_median"]]
                               + [f"{_fmt(a[name + '_median'])} / {_fmt(a[name + '_worst'])}" for name in others]
                               for a in aggregated])]
    # The seed's pivot: one row per architecture, one column per encoding (best config each).
    archs = sorted({a["arch"] for a in aggregated})
    pes = [p for p in PE_TITLES if any(a["pe"] == p for a in aggregated)]
    pes += sorted({a["pe"] for a in aggregated} - set(pes))
    if len(pes) > 1 or len(archs) > 1:
        for metric, what in (("median", "Validation loss"), ("regressive_median", "Regressive MSE")):
            rows = []
            for arch in archs:
                row = [arch.upper()]
                for pe in pes:
                    vals = [a[metric] for a in aggregated if a["arch"] == arch and a["pe"] == pe]
                    row.append(min(vals) if vals else "-")
                rows.append(row)
            md += ["", f"## {what} by architecture and encoding", "",
                   markdown_table(["Model"] + [PE_TITLES.get(p, p) for p in pes], rows)]

    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(["file", "arch", "pe", "seed", "hparams", "val_loss", "best_val_loss", "regressive_mse",
                "regressive_mae", "batch_mse", "batch_mae", "noise_floor_variance", "batch_mse_over_noise_floor",
                "train_seconds", "data"] + [f"regressive_mse_on_{name}" for name in others])
    for m in runs:
        f = m["forecast"]
        hp = ";".join(f"{k}={v}" for k, v in sorted(m["hparams"].items()))
        w.writerow([run_name(m), m["arch"], m["pe"], m["seed"], hp, repr(m["val_loss"]), repr(m["best_val_loss"]),
                    repr(f["regressive"]["mse"]), repr(f["regressive"]["mae"]), repr(f["batch"]["mse"]),
                    repr(f["batch"]["mae"]), repr(m["noise_floor"]["variance"]), repr(_noise_ratio(m)),
                    m.get("train_seconds"), m["data"]] + [repr(_other_mse(m, name)) for name in others])
    return Tables(runs, "\n".join(md) + "\n", out.getvalue(), aggregated)


def write_report(runs: list[dict], out_dir: str, stem: str = "results", title: str = "Results") -> Tables:
    from .plots import plot_comparison

    tables = build_tables(runs, title)
    C.atomic_write_text(os.path.join(out_dir, f"{stem}.md"), tables.markdown)
    C.atomic_write_text(os.path.join(out_dir, f"{stem}.csv"), tables.csv)
    if tables.aggregated:
        ag = tables.aggregated
        plot_comparison([a["config"] for a in ag], [a["median"] for a in ag], os.path.join(out_dir, f"{stem}_loss.png"),
                        title="validation loss (median over seeds)", xlabel="normalised MSE",
                        errors=[a["spread"] for a in ag] if any(a["seeds"] > 1 for a in ag) else None)
        runs_sorted = tables.runs
        ratios = [_noise_ratio(m) for m in runs_sorted]
        plot_comparison([run_name(m).split("/")[0] for m in runs_sorted], ratios,
                        os.path.join(out_dir, f"{stem}_noise_floor.png"),
                        title="one-step MSE relative to the noise floor", xlabel="one-step MSE / noise-floor variance",
                        reference=1.0, reference_label="noise floor")
    return tables
