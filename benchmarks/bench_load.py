"""Loading a large long-format CSV: wall time and peak extra memory against the file size.

Usage: python benchmarks/bench_load.py [--mb 200] [--series 1000] [--keep DIR]

Writes a long-format CSV (``unique_id,ds,y``: hourly timestamps, random walks with 4 decimals) of
about ``--mb`` MB into a temporary directory, then loads it with ``vqext.data.load_panel`` in a fresh
subprocess and reports the wall time, the CPU time (which, unlike the wall time, does not grow
when other jobs share the cores) and the peak resident memory above the subprocess' level
after its imports (``resource.getrusage`` maxrss, which sees pandas' and pyarrow's C allocations;
tracemalloc does not). Targets: <= 10 s and <= 3x the file size.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

CHILD = r"""
import json, resource, sys, time
import vqext.data
r0 = resource.getrusage(resource.RUSAGE_SELF)
t0 = time.perf_counter()
panel = vqext.data.load_panel(sys.argv[1], progress=True)
seconds = time.perf_counter() - t0
r1 = resource.getrusage(resource.RUSAGE_SELF)
cpu = (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)
points = sum(len(s) for s in panel)
print(json.dumps({"seconds": seconds, "cpu_seconds": cpu, "extra_kib": r1.ru_maxrss - r0.ru_maxrss,
                  "series": len(panel), "points": points}))
"""


def write_csv(path: str, target_mb: float, n_series: int) -> int:
    """A long-format CSV of about ``target_mb`` MB (~36.5 bytes a row); returns the number of rows."""
    import pyarrow as pa
    import pyarrow.csv as pc
    rows_per_series = max(2, int(target_mb * 1e6 / 36.5 / n_series))
    rng = np.random.default_rng(0)
    ids = pa.array(np.repeat(np.array([f"S{i:05d}" for i in range(n_series)]), rows_per_series))
    hours = np.datetime64("2020-01-01T00:00:00", "s") + np.arange(rows_per_series).astype("timedelta64[h]")
    ds = pa.array(np.tile(hours, n_series))
    y = np.round(100 + np.cumsum(rng.standard_normal((n_series, rows_per_series)), axis=1).ravel(), 4)
    table = pa.table({"unique_id": ids, "ds": ds, "y": pa.array(y)})
    pc.write_csv(table, path, write_options=pc.WriteOptions(quoting_style="none"))
    return n_series * rows_per_series


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=200.0, help="approximate file size in MB (default 200)")
    ap.add_argument("--series", type=int, default=1000, help="number of series (default 1000)")
    ap.add_argument("--keep", metavar="DIR", help="write the CSV here and keep it (default: a temporary directory)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.keep or tmp
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"long_{int(args.mb)}mb.csv")
        t0 = time.perf_counter()
        rows = write_csv(path, args.mb, args.series)
        size = os.path.getsize(path)
        print(f"wrote {path}: {size / 1e6:.1f} MB, {rows:,} rows, {args.series} series "
              f"({time.perf_counter() - t0:.1f} s)", flush=True)
        child = subprocess.run([sys.executable, "-c", CHILD, path], capture_output=True, text=True)
        sys.stderr.write(child.stderr)
        if child.returncode != 0:
            sys.exit(f"bench_load: the loading subprocess failed (exit {child.returncode})")
        r = json.loads(child.stdout.strip().splitlines()[-1])
        extra = r["extra_kib"] * 1024
        print(f"load_panel: {r['seconds']:.2f} s wall, {r['cpu_seconds']:.2f} s CPU (all threads), "
              f"{r['series']} series, {r['points']:,} points; load average {os.getloadavg()[0]:.1f} "
              f"on {os.cpu_count()} CPUs")
        print(f"peak extra memory: {extra / 1e6:.0f} MB = {extra / size:.2f}x the file size "
              f"({size / 1e6:.0f} MB)")
        print(f"targets: <= 10 s ({'met' if r['seconds'] <= 10 else 'MISSED'}), "
              f"<= 3x ({'met' if extra <= 3 * size else 'MISSED'})")


if __name__ == "__main__":
    main()
