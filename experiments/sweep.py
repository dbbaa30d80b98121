"""Run named configurations over seeds; append one JSON line per (config, seed) to results.jsonl.

    python sweep.py CONFIG [CONFIG ...] --seeds 0,1,2 [--out results.jsonl]
    python sweep.py --list
A config already in the output for a seed is skipped, so an interrupted sweep resumes.
"""
from __future__ import annotations

import argparse
import json
import sys
import os
import time

import numpy as np

import common
from common import TrainConfig
import models as M

CONFIGS: dict[str, tuple] = {}


def cfg(name, model, train=None, **model_kw):
    CONFIGS[name] = (model, model_kw, train or {})


# baselines (no training)
cfg("repeat_last", "RepeatLast", {"epochs": 0})
cfg("window_mean", "WindowMean", {"epochs": 0})
cfg("lstm", "LSTMModel", {"lr": 1e-3, "epochs": 50}, hidden=64, layers=2)
cfg("lstm_lr3e-3", "LSTMModel", {"lr": 3e-3, "epochs": 50}, hidden=64, layers=2)

# the seed's 8 configurations
for arch, mh in (("vqlnmlp", False), ("mhvqlnmlp", True)):
    for pe in ("none", "randn", "sinpe", "rope"):
        cfg(f"seed_{arch}_{pe}", "SeedVQ", {"lr": 7e-3, "epochs": 50},
            d=64, K=512, heads=(2 if pe in ("none", "randn") else 8), pe=pe, multihead=mh)

# the same with 15 epochs (the loaded shared machine could not fit 24 x 50 epochs in the session)
for arch, mh in (("vqlnmlp", False), ("mhvqlnmlp", True)):
    for pe in ("none", "randn", "sinpe", "rope"):
        cfg(f"seed15_{arch}_{pe}", "SeedVQ", {"lr": 7e-3, "epochs": 15},
            d=64, K=512, heads=(2 if pe in ("none", "randn") else 8), pe=pe, multihead=mh)

# VQ former family: base and one-factor variations
BASE_M = dict(d=64, heads=4, depth=2, K=64, pe="rope", causal=True, cb_trained=True,
              cb_scale=None, quantizer="soft", residual=True)
BASE_T = dict(lr=3e-3, epochs=40, schedule="cosine", warmup=0.05, clip=1.0)


def vqf(name, train=None, **kw):
    cfg(name, "VQFormer", {**BASE_T, **(train or {})}, **{**BASE_M, **kw})


vqf("vqf_base")
vqf("vqf_level", residual=False)
vqf("vqf_frozen", cb_trained=False)
vqf("vqf_hard", quantizer="hard")
vqf("vqf_nocausal", causal=False)
vqf("vqf_noSA", self_attn=False)
vqf("vqf_noSA_level", self_attn=False, residual=False)
vqf("vqf_pe_none", pe="none")
vqf("vqf_pe_sinpe", pe="sinpe")
vqf("vqf_pe_sinpe_off", {"max_offset": 512}, pe="sinpe")
vqf("vqf_pe_randn", pe="randn")
vqf("vqf_depth1", depth=1)
vqf("vqf_depth3", depth=3)
vqf("vqf_h1", heads=1)
vqf("vqf_h8", heads=8)
vqf("vqf_d32", d=32)
vqf("vqf_d128", d=128)
vqf("vqf_K16", K=16)
vqf("vqf_K512", K=512)
vqf("vqf_scale_hi", cb_scale=1.0)
vqf("vqf_scale_lo", cb_scale=0.05)
vqf("vqf_const_lr", {"schedule": "const", "warmup": 0.0})
vqf("vqf_lr1e-3", {"lr": 1e-3})
vqf("vqf_lr7e-3", {"lr": 7e-3})
vqf("vqf_ep20", {"epochs": 20})
vqf("vqf_ep80", {"epochs": 80})
vqf("vqf_noise05", {"input_noise": 0.05})
vqf("vqf_noise10", {"input_noise": 0.10})
vqf("vqf_noise20", {"input_noise": 0.20})
vqf("vqf_noise30", {"input_noise": 0.30})
vqf("vqf_noise20_level", {"input_noise": 0.20}, residual=False)
vqf("vqf_ar", ar_skip=96)
vqf("vqf_ar_noise10", {"input_noise": 0.10}, ar_skip=96)
vqf("vqf_ar_noise05", {"input_noise": 0.05}, ar_skip=96)
vqf("vqf_ar_noise10_lastw", {"input_noise": 0.10, "last_weight": 1.0}, ar_skip=96)
vqf("vqf_noise10_lastw", {"input_noise": 0.10, "last_weight": 1.0})
vqf("vqf_noise10_pf1", {"input_noise": 0.10, "pushforward": 1})
vqf("vqf_pf1", {"pushforward": 1})
vqf("vqf_ar_noise10_lastw3", {"input_noise": 0.10, "last_weight": 3.0}, ar_skip=96)
vqf("vqf_ar_noise10_lastw3_k4", {"input_noise": 0.10, "last_weight": 3.0, "last_k": 4}, ar_skip=96)
vqf("vqf_ar_noise10_lastw3_pf1", {"input_noise": 0.10, "last_weight": 3.0, "pushforward": 1}, ar_skip=96)
vqf("vqf_ar_noise10_lastw_pf1", {"input_noise": 0.10, "last_weight": 1.0, "pushforward": 1}, ar_skip=96)
vqf("vqf_ar_noise10_lastw_ep80", {"input_noise": 0.10, "last_weight": 1.0, "epochs": 80}, ar_skip=96)
vqf("vqf_ar_noise05_lastw", {"input_noise": 0.05, "last_weight": 1.0}, ar_skip=96)
vqf("vqf_ar_noise10_lastw_frozen", {"input_noise": 0.10, "last_weight": 1.0}, ar_skip=96, cb_trained=False)
vqf("vqf_ar_noise10_lastw_hard", {"input_noise": 0.10, "last_weight": 1.0}, ar_skip=96, quantizer="hard")
vqf("vqf_ar_noise10_lastw_lr1e-3", {"input_noise": 0.10, "last_weight": 1.0, "lr": 1e-3}, ar_skip=96)
REC_T = {"input_noise": 0.10, "last_weight": 1.0, "pushforward": 1}
vqf("vqf_rec_frozen", REC_T, ar_skip=96, cb_trained=False)
vqf("vqf_rec_hard", REC_T, ar_skip=96, quantizer="hard")
vqf("vqf_rec_noar", REC_T)
vqf("vqf_rec_h8", REC_T, ar_skip=96, heads=8)
vqf("vqf_rec_depth1", REC_T, ar_skip=96, depth=1)
vqf("vqf_rec_ep50", {**REC_T, "epochs": 50}, ar_skip=96)
vqf("vqf_last8", {"loss_last": 8})
vqf("vqf_T48", {"T": 48})
vqf("vqf_T192", {"T": 192})


def build(name):
    model, kw, tr = CONFIGS[name]
    tcfg = TrainConfig(**tr)
    return (lambda: getattr(M, model)(**kw)), tcfg, kw


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("names", nargs="*")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--out", default="results.jsonl")
    ap.add_argument("--list", action="store_true")
    a = ap.parse_args(argv)
    if a.list:
        print("\n".join(CONFIGS))
        return
    done = {(r["name"], r["seed"]) for r in common.read_jsonl(a.out)}
    seeds = [int(s) for s in a.seeds.split(",")]
    for name in a.names:
        if name not in CONFIGS:
            sys.exit(f"unknown config {name!r}")
        for seed in seeds:
            if (name, seed) in done:
                continue
            make, tcfg, kw = build(name)
            res, _ = common.run(make, tcfg, seed, keep_preds=True)
            os.makedirs("out", exist_ok=True)
            np.savez(f"out/preds_{name}_{seed}.npz", yw=res.pop("pred_yw"), wy=res.pop("pred_wy"))
            rec = dict(name=name, model=CONFIGS[name][0], model_kw=kw, train=tcfg.__dict__, **res)
            common.append_jsonl(a.out, rec)
            print(f"{name:28s} seed {seed} val {res['val']:.5f} reg_yw {res['reg_yw']:10.1f} "
                  f"reg_wy {res['reg_wy']:10.1f} cpu {res['train_cpu_s']:6.1f}s "
                  f"({res['cpu_per_epoch']:.2f}s/ep) wall {res['train_wall_s']:6.1f}s", flush=True)


if __name__ == "__main__":
    main()
