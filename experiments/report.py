"""Aggregate results*.jsonl into markdown tables: per-seed numbers, median and worst of seeds."""
from __future__ import annotations

import glob
import os
import statistics
import sys

import common


def load(paths=None):
    recs = []
    for p in paths or sorted(glob.glob("results*.jsonl")):
        recs += common.read_jsonl(p)
    by = {}
    for r in recs:
        by.setdefault(r["name"], {})[r["seed"]] = r  # last record per (name, seed) wins
    return by


def fmt(v, k):
    return f"{v:.5f}" if k == "val" else f"{v:,.0f}"


def table(by, names=None):
    rows = ["| config | seeds | val loss per seed | median val | reg y+w per seed | median | worst/median"
            " | reg w+y per seed | median w+y | train CPU s/seed (s/epoch) |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for name in names or by:
        if name not in by:
            continue
        rs = [by[name][s] for s in sorted(by[name])]
        med = {k: statistics.median(r[k] for r in rs) for k in ("val", "reg_yw", "reg_wy")}
        worst = max(r["reg_yw"] for r in rs) / med["reg_yw"] if med["reg_yw"] else float("nan")
        cpu = statistics.median(r["train_cpu_s"] for r in rs)
        cpe = statistics.median(r["cpu_per_epoch"] for r in rs)
        rows.append(
            f"| {name} | {','.join(str(r['seed']) for r in rs)} | "
            f"{' / '.join(fmt(r['val'], 'val') for r in rs)} | **{fmt(med['val'], 'val')}** | "
            f"{' / '.join(fmt(r['reg_yw'], 'r') for r in rs)} | **{fmt(med['reg_yw'], 'r')}** | "
            f"{worst:.2f} | {' / '.join(fmt(r['reg_wy'], 'r') for r in rs)} | "
            f"**{fmt(med['reg_wy'], 'r')}** | {cpu:.0f} ({cpe:.2f}) |")
    return "\n".join(rows)


def fill(template="FINDINGS.md"):
    """Replace the block after each '<!-- table: prefix1,prefix2 -->' marker (up to the next blank
    line) with the table of the configs whose names start with those prefixes."""
    by = load()
    lines = open(template).read().split("\n")
    out, i = [], 0
    while i < len(lines):
        out.append(lines[i])
        if lines[i].startswith("<!-- table:"):
            prefixes = tuple(p.strip() for p in lines[i][len("<!-- table:"):-3].split(","))
            names = [n for n in by if n.startswith(prefixes)]
            out.append(table(by, names))
            i += 1
            while i < len(lines) and lines[i].strip():
                i += 1
            continue
        i += 1
    tmp = template + ".tmp"
    with open(tmp, "w") as f:
        f.write("\n".join(out))
    os.replace(tmp, template)


if __name__ == "__main__":
    if sys.argv[1:] == ["--fill"]:
        fill()
    else:
        print(table(load(sys.argv[1:] or None)))
