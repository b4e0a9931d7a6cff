#!/usr/bin/env python
"""Bias correction inside the λ search, measured before building it (docs/benchmarks.md "Bias correction inside
the search"; rows in examples/heldout/bias_correction_in_search.jsonl).

Calibrates on a seeded random 2,000 of CALIB; validation = the first 1,000 of them, test = a seeded random 2,000 of
TEST. For each λ of a grid (0.05·2^(k/4), k = 0..12: 0.05 … 0.4) it measures agreement with the ANN on both and the
energy ratio, without and with the correction (256 other calibration images) at that λ, one JSON row per λ; then,
per agreement budget (100 − b points, b = 0.5, 1, 2, 4), the largest λ of the grid within it on validation, chosen
(a) on the uncorrected curve and then corrected (what `convert` does) and (b) on the corrected curve.

    python examples/heldout/bias_correction_in_search.py examples/models/heldout/gap_cnn.pt2 \
        mnist:/work/shared/data/mnist:0:8000 mnist:/work/shared/data/mnist:8000:10000
"""
import json
import sys

import torch

from sfn_deploy import bias_correction as bc
from sfn_deploy.config import load_config
from sfn_deploy.convert import build_graph
from sfn_deploy.data import load_data
from sfn_deploy.evaluation import energy_constants, measure
from sfn_deploy.models import load_model
from sfn_deploy.passes import set_scale

GRID = [0.05 * 2 ** (k / 4) for k in range(13)]     # 0.05 … 0.4


def agreement(pred: torch.Tensor, ann: torch.Tensor) -> float:
    return round(100 * float((pred == ann).float().mean()), 2)


def main() -> None:
    torch.set_num_threads(2)
    model_path, cal, tst = sys.argv[1:4]
    model, _ = load_model(model_path)
    calib = load_data(cal).sample(2000, 0)
    val, test = calib.limit(1000), load_data(tst).sample(2000, 1)
    graph = build_graph(model, calib, load_config("", {"scale": 1.0}), quiet=True)
    xb = calib.sample(256, 1).x
    e = energy_constants()
    ann_v, ann_t = measure(graph, val, spiking=False)[0], measure(graph, test, spiking=False)[0]
    rows = []
    for lam in GRID:
        r = {"model": model_path, "lam": round(lam, 4)}
        for mode in ("off", "on"):
            bc.revert(graph)
            set_scale(graph, lam)
            if mode == "on":
                bc.apply(graph, bc.shifts(graph, xb))
            pv, pt, ct = measure(graph, val)[0], *measure(graph, test)
            r[mode] = {"val": agreement(pv, ann_v), "test": agreement(pt, ann_t),
                       "energy": round(ct.result().energy_ratio(*e), 4)}
        bc.revert(graph)
        rows.append(r)
        print(json.dumps(r), flush=True)
    best = max(r["off"]["val"] for r in rows)
    for b in (0.5, 1.0, 2.0, 4.0):      # budgets below the most accurate uncorrected point on validation
        picks = {}
        for way, mode in (("search_then_correct", "off"), ("correct_in_search", "on")):
            ok = [r for r in rows if r[mode]["val"] >= best - b]
            top = max(ok, key=lambda r: r["lam"]) if ok else None
            picks[way] = top and {"lam": top["lam"], **top["on"]}
        print(json.dumps({"model": model_path, "budget_val_agreement": round(best - b, 2), **picks}), flush=True)


if __name__ == "__main__":
    main()
