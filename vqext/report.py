"""Reports: tables (markdown, CSV) and plots of finished runs found under run directories."""
from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
from dataclasses import dataclass, field

import numpy as np

from . import config as C
from .errors import ConfigError, VqextError
from .io import atomic_write_text, read_json

# ------------------------------------------------------------------------------------ reports
def find_runs(paths: list[str]) -> tuple[list[dict], list[str]]:
    """Metrics of every finished run under ``paths`` (run dirs or folders of them), and one note
    for each run directory that is skipped (unfinished, unreadable or not written by vqext)."""
    runs, notes, seen = [], [], set()
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
                notes.append(f"skipping unfinished run {dirpath}")
                continue
            try:
                m = read_json(os.path.join(dirpath, C.METRICS_FILE), "run metrics")
                _check_metrics(m, os.path.join(dirpath, C.METRICS_FILE))
                m["config"] = _identity(dirpath)
                m["other_forecasts"] = _other_forecasts(dirpath, notes)
            except (VqextError, OSError) as exc:
                notes.append(f"skipping {dirpath}: {exc}")
                continue
            m["run"] = dirpath
            runs.append(m)
    return runs, notes


def _identity(run_dir: str) -> str:
    """The run's resolved configuration without seed and device (see RunConfig.identity), as
    canonical JSON: runs with equal identities are one configuration."""
    path = os.path.join(run_dir, C.CONFIG_FILE)
    try:
        cfg = C.RunConfig.from_dict(read_json(path, "run config"))
    except ConfigError as exc:
        raise ConfigError(f"run config {path}: {exc}") from None
    return json.dumps(cfg.identity(), sort_keys=True, default=repr)


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


def _other_forecasts(run_dir: str, notes: list[str]) -> dict:
    """``vqext forecast`` results kept in ``RUN/forecasts/<series>/metrics.json``, by folder name."""
    found = {}
    root = os.path.join(run_dir, "forecasts")
    if os.path.isdir(root):
        for name in sorted(os.listdir(root)):
            path = os.path.join(root, name, C.METRICS_FILE)
            if os.path.isfile(path):
                try:
                    f = read_json(path, "forecast metrics")
                    float(f["regressive"]["mse"])
                except (VqextError, OSError, KeyError, TypeError, ValueError) as exc:
                    notes.append(f"skipping forecast {path}: {exc if isinstance(exc, VqextError) else 'not a vqext forecast metrics file'}")
                    continue
                found[name] = f
    return found


def run_name(m: dict) -> str:
    """``label/timestamp`` like the log's File column."""
    parts = os.path.normpath(m["run"]).split(os.sep)
    return "/".join(parts[-2:])


def config_key(m: dict) -> str:
    """A run's configuration without its seed (runs that differ only in seed aggregate): the
    whole resolved configuration, data source included."""
    return m.get("config") or json.dumps({k: m.get(k) for k in ("arch", "pe", "hparams", "data", "time_steps")},
                                         sort_keys=True, default=repr)


def config_name(m: dict) -> str:
    """A readable name for the configuration: the run label without its seed."""
    label = os.path.normpath(m["run"]).split(os.sep)[-2]
    return label.rsplit("_s", 1)[0] if label.endswith(f"_s{m.get('seed')}") else label


def markdown_table(header: list[str], rows: list[list], align: str | None = None) -> str:
    cells = [[str(c) for c in header]] + [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(r[j]) for r in cells) for j in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(cells[0], widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in cells[1:]]
    return "\n".join(lines)


def _fmt(v) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf") if math.isinf(v) else f"{v:.6g}"
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
    med = _median(values)
    return _worst(values) / med if med > 0 else float("nan")


# NaN and inf are results too (a diverged run): any NaN makes an aggregate NaN, never an error.
def _median(values) -> float:
    return float(np.median(np.asarray(list(values), dtype=np.float64)))


def _mean(values) -> float:
    return float(np.mean(np.asarray(list(values), dtype=np.float64)))


def _spread(values) -> float:
    v = np.asarray(list(values), dtype=np.float64)
    if len(v) < 2:
        return 0.0
    with np.errstate(invalid="ignore"):
        return float(np.std(v, ddof=1))


def _worst_index(values: list[float]) -> int:
    nan = [i for i, v in enumerate(values) if math.isnan(v)]
    return nan[0] if nan else max(range(len(values)), key=lambda i: values[i])


def _worst(values: list[float]) -> float:
    return values[_worst_index(values)]


def _order(v: float) -> tuple:
    """Sort key that puts NaN last."""
    return (math.isnan(v), v if not math.isnan(v) else 0.0)


def _other_mse(m: dict, name: str) -> float:
    f = m.get("other_forecasts", {}).get(name)
    return float(f["regressive"]["mse"]) if f else float("nan")


def _pe_title(pe: str) -> str:
    try:
        from .registry import get_pe

        return getattr(get_pe(pe), "title", None) or pe
    except Exception:  # noqa: BLE001 - a table heading must not fail on a plugin problem
        return pe


def _pe_order(pe: str) -> tuple:
    """The log's column order: no encoding, added tables, then rotations; names break ties."""
    try:
        from .registry import get_pe

        mode = getattr(get_pe(pe), "mode", "add")
    except Exception:  # noqa: BLE001
        mode = "add"
    return ({"identity": 0, "add": 1, "rotate": 2}.get(mode, 3), pe)


def _runs_section(runs: list[dict], others: list[str]) -> list[str]:
    header = (["File", "Loss", "Regressive MSE", "Regressive MAE", "One-step MSE", "One-step MSE / noise floor",
               "Regressive MSE / noise floor"] + [f"Regressive MSE on {name}" for name in others])
    md = [markdown_table(header, [[run_name(m), m["val_loss"], m["forecast"]["regressive"]["mse"],
                                   m["forecast"]["regressive"]["mae"], m["forecast"]["batch"]["mse"],
                                   _noise_ratio(m), _noise_ratio(m, "regressive")]
                                  + [_other_mse(m, name) for name in others] for m in runs])]
    if others:
        md += ["", "Regressive MSE on another series: `vqext forecast --run RUN --data CSV` (normalised with "
               "that series' own statistics), kept in RUN/forecasts/<series>/."]
    floors = {(m["data"], m["noise_floor"]["window"], round(m["noise_floor"]["variance"], 6)) for m in runs}
    md += ["", "Noise floor: residual variance of a least-squares autoregression on the series "
           "(errors below it are not meaningful; an MSE ratio near 1 is as good as it gets, and "
           "ratio - 1 is roughly what is left to gain):"]
    md += [f"- {d}: autoregression of order {w}, variance {v:.6g}" for d, w, v in sorted(floors)]
    return md


def _series_of(m: dict) -> str:
    """The series a run was trained on: its source, and its content hash where recorded."""
    try:
        cfg = json.loads(config_key(m))
    except ValueError:
        cfg = {}
    return json.dumps([m.get("data"), cfg.get("data_sha256"), cfg.get("column"), cfg.get("data_rows")])


def _aggregate(runs: list[dict], others: list[str]) -> list[dict]:
    """One row per configuration (runs whose whole resolved configuration, data included, differs
    only in the seed), best median loss first."""
    for m in runs:
        if not m.get("config") and os.path.isfile(os.path.join(m.get("run", ""), C.CONFIG_FILE)):
            try:
                m["config"] = _identity(m["run"])
            except VqextError:
                pass
    groups: dict[str, list[dict]] = {}
    for m in runs:
        groups.setdefault(config_key(m), []).append(m)
    names: dict[str, set] = {}
    for key, ms in groups.items():
        names.setdefault(config_name(ms[0]), set()).add(key)
    aggregated = []
    for key, ms in groups.items():
        name = config_name(ms[0])
        if len(names[name]) > 1:  # one label, different configurations: tell them apart
            name += "#" + hashlib.sha256(key.encode()).hexdigest()[:6]
        losses = [float(m["val_loss"]) for m in ms]
        reg = [float(m["forecast"]["regressive"]["mse"]) for m in ms]
        row = {"config": name, "key": key, "series": _series_of(ms[0]), "data": ms[0].get("data"),
               "arch": ms[0]["arch"], "pe": ms[0]["pe"], "seeds": len(ms),
               "median": _median(losses), "mean": _mean(losses), "spread": _spread(losses),
               "worst": _worst(losses), "worst_seed": ms[_worst_index(losses)].get("seed"),
               "regressive_median": _median(reg), "regressive_mean": _mean(reg), "regressive_spread": _spread(reg),
               "regressive_worst": _worst(reg), "regressive_worst_seed": ms[_worst_index(reg)].get("seed"),
               "regressive_worst_over_median": _worst_over_median(reg),
               "regressive_median_over_floor": _median(_noise_ratio(m, "regressive") for m in ms),
               "train_seconds_median": _median(float(m.get("train_seconds") or 0.0) for m in ms)}
        for other in others:
            vals = [v for v in (_other_mse(m, other) for m in ms) if not math.isnan(v)]
            row[f"{other}_median"] = _median(vals) if vals else float("nan")
            row[f"{other}_worst"] = _worst(vals) if vals else float("nan")
        aggregated.append(row)
    aggregated.sort(key=lambda a: (_order(a["median"]), a["config"]))
    return aggregated


def _seeds_section(aggregated: list[dict], others: list[str]) -> list[str]:
    if not any(a["seeds"] > 1 for a in aggregated):
        return []
    return ["", "## Across seeds", "",
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


def _pivot_section(aggregated: list[dict]) -> list[str]:
    """The log's pivot: one row per architecture, one column per encoding (best config each),
    one pair of tables per series (a minimum never spans two series)."""
    by_series: dict[str, list[dict]] = {}
    for a in aggregated:
        by_series.setdefault(a["series"], []).append(a)
    md = []
    for series, rows_of in sorted(by_series.items()):
        archs = sorted({a["arch"] for a in rows_of})
        pes = sorted({a["pe"] for a in rows_of}, key=_pe_order)
        if len(pes) <= 1 and len(archs) <= 1:
            continue
        on = f" on {rows_of[0]['data']}" if len(by_series) > 1 else ""
        for metric, what in (("median", "Validation loss"), ("regressive_median", "Regressive MSE")):
            rows = []
            for arch in archs:
                row = [arch.upper()]
                for pe in pes:
                    vals = [a[metric] for a in rows_of if a["arch"] == arch and a["pe"] == pe]
                    row.append(min(vals, key=_order) if vals else "-")
                rows.append(row)
            md += ["", f"## {what} by architecture and encoding{on}", "",
                   markdown_table(["Model"] + [_pe_title(p) for p in pes], rows)]
    return md


def _runs_csv(runs: list[dict], others: list[str]) -> str:
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
    return out.getvalue()


def build_tables(runs: list[dict], title: str = "Results") -> Tables:
    runs = sorted(runs, key=lambda m: (_order(float(m["val_loss"])), run_name(m)))
    others = sorted({name for m in runs for name in m.get("other_forecasts", {})})
    aggregated = _aggregate(runs, others)
    md = [f"# {title}", "", f"{len(runs)} runs, sorted by validation loss (normalised MSE on the validation windows).", ""]
    md += _runs_section(runs, others) + _seeds_section(aggregated, others) + _pivot_section(aggregated)
    return Tables(runs, "\n".join(md) + "\n", _runs_csv(runs, others), aggregated)


def write_report(runs: list[dict], out_dir: str, stem: str = "results", title: str = "Results") -> Tables:
    from .plots import plot_comparison

    tables = build_tables(runs, title)
    atomic_write_text(os.path.join(out_dir, f"{stem}.md"), tables.markdown)
    atomic_write_text(os.path.join(out_dir, f"{stem}.csv"), tables.csv)
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
