"""Plot regressive forecasts saved by sweep.py: python plot.py NAME:SEED [NAME:SEED ...] -o out.png"""
import argparse

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

import common

ap = argparse.ArgumentParser()
ap.add_argument("runs", nargs="+")
ap.add_argument("-o", default="out/regressive.png")
ap.add_argument("--T", type=int, default=96)
a = ap.parse_args()
fig, axes = plt.subplots(1, 2, figsize=(14, 4.5))
for ax, key, series in ((axes[0], "yw", "y+w.csv"), (axes[1], "wy", "w+y.csv")):
    s = common.load_series(series)
    ax.plot(s, color="0.6", lw=0.8, label="true")
    for run in a.runs:
        name, seed = run.rsplit(":", 1)
        p = np.load(f"out/preds_{name}_{seed}.npz")[key]
        mse = np.mean((p - s[a.T:]) ** 2)
        ax.plot(np.arange(a.T, a.T + len(p)), p, lw=1.2, label=f"{run} MSE {mse:,.0f}")
    ax.set_title(f"regressive forecast on {series}")
    ax.set_xlabel("step"); ax.set_ylabel("ug/m³"); ax.legend(fontsize=7)
fig.tight_layout()
fig.savefig(a.o, dpi=110)
print(a.o)
