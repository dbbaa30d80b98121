"""Closed-form ridge AR(T) baseline under the same protocol (deterministic, no seed).

Fits x[t+1] ~ w . x[t-T+1..t] + b on the last position of each training window (full history),
reports val loss over all positions (early positions use replicate-padded history) and regressive
MSE on y+w and w+y. Shows what a purely linear predictor achieves on this series.
"""
import numpy as np

import common

T = 96
s = common.load_series("y+w.csv")
z = common.Normaliser(s)(s)
x, y = common.make_windows(z, T)
itr, iva = common.split(x.shape[0])


def padded_feats(xw):
    X = np.concatenate([np.repeat(xw[:, :1], T - 1, 1), xw], 1)
    idx = np.arange(T)[:, None] + np.arange(T)[None, :]
    return X[:, idx]  # (N, T positions, T lags)


for lam in (1.0, 10.0):
    A = np.c_[x[itr].numpy(), np.ones(len(itr))]
    w = np.linalg.solve(A.T @ A + lam * np.eye(T + 1), A.T @ y[itr, -1].numpy())
    Fv = padded_feats(x[iva].numpy())
    val = float(np.mean((Fv @ w[:-1] + w[-1] - y[iva].numpy()) ** 2))
    regs = []
    for name in ("y+w.csv", "w+y.csv"):
        ss = common.load_series(name)
        nm = common.Normaliser(ss)
        win, out = list(nm(ss)[:T]), []
        for _ in range(len(ss) - T):
            out.append(float(np.dot(w[:-1], win[-T:]) + w[-1]))
            win.append(out[-1])
        regs.append(float(np.mean((nm.inverse(np.array(out)) - ss[T:]) ** 2)))
    print(f"ridge AR({T}) lambda={lam:g}: val {val:.5f} reg y+w {regs[0]:,.0f} reg w+y {regs[1]:,.0f}")
