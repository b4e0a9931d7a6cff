#!/usr/bin/env python
"""Test accuracy and energy ratio of a model converted with one shared λ (``--scale``), over a fine λ grid.

Calibrates once (capture → fold_batchnorm → insert_sfn → calibrate on ``--data``, exactly ``sfn-deploy convert``'s
passes), then for each λ sets the scale (``passes.set_scale``, what ``convert --scale λ`` does) and measures the
SNN on ``--test`` (what ``sfn-deploy evaluate`` does; the ANN once). The default grid is λ = 0.02·1.02^k up to
1.0 (steps of 2 %, the whole range the λ search explores: tuning.py suggests λ in [0.02, 1.0]), then 1.0.

Prints one line per λ and the largest accuracy change between neighbouring λ; ``--json FILE`` writes the rows.

Usage:
  .venv/bin/python examples/heldout/sweep_lambda.py examples/models/heldout/avgpool_cnn.pt2 \\
      --data /tmp/heldout/mnist01_train.npz --test /tmp/heldout/mnist01_test.npz
  .venv/bin/python examples/heldout/sweep_lambda.py examples/models/mnist_cnn.pt2 \\
      --data mnist:/work/shared/data/mnist:0:8000 --test mnist:/work/shared/data/mnist:8000:10000 --lam 0.2
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from itertools import pairwise

import torch

from sfn_deploy.config import load_config
from sfn_deploy.convert import build_graph
from sfn_deploy.data import load_data
from sfn_deploy.evaluation import accuracy, energy_constants, measure
from sfn_deploy.models import load_model
from sfn_deploy.passes import set_scale


def grid(lo: float = 0.02, hi: float = 1.0, ratio: float = 1.02) -> list[float]:
    out, v = [], lo
    while v < hi * (1 - 1e-9):
        out.append(round(v, 6))
        v *= ratio
    return [*out, hi]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model")
    p.add_argument("--data", required=True, help="calibration data (as sfn-deploy convert --data)")
    p.add_argument("--test", required=True, help="test data (as sfn-deploy evaluate --data)")
    p.add_argument("--lam", type=float, action="append", help="these λ instead of the grid (repeatable)")
    p.add_argument("--lo", type=float, default=0.02)
    p.add_argument("--hi", type=float, default=1.0)
    p.add_argument("--ratio", type=float, default=1.02)
    p.add_argument("--levels", type=int, default=8)
    p.add_argument("--rounding", default="paper")
    p.add_argument("--json", metavar="FILE")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, _ = load_model(args.model)
    cfg = load_config("", {"levels": args.levels, "rounding": args.rounding, "scale": 1.0})
    t0 = time.time()
    graph = build_graph(model, load_data(args.data), cfg, quiet=True)
    calib_s = time.time() - t0
    test = load_data(args.test)
    ann_pred, _ = measure(graph, test, spiking=False)
    ann = accuracy(ann_pred, test.y)
    e_ac, e_mac = energy_constants()
    rows = []
    print(f"{args.model}: {len(graph.sites)} sites, calibrated in {calib_s:.1f} s; ANN {ann:.2f}% on {test.name}")
    print(f"{'lambda':>8} {'SNN %':>7} {'drop':>6} {'energy':>7}")
    for lam in args.lam or grid(args.lo, args.hi, args.ratio):
        set_scale(graph, lam)
        pred, counter = measure(graph, test)
        acc = accuracy(pred, test.y)
        er = counter.result().energy_ratio(e_ac, e_mac)
        rows.append({"lam": lam, "accuracy": acc, "energy_ratio": er})
        print(f"{lam:8.4f} {acc:7.2f} {ann - acc:6.2f} {er:7.4f}", flush=True)
    if len(rows) > 1:
        jumps = [(abs(b["accuracy"] - a["accuracy"]), a["lam"], b["lam"]) for a, b in pairwise(rows)]
        worst = max(jumps)
        print(f"largest accuracy change between neighbours: {worst[0]:.2f} points (λ {worst[1]:.4f} → {worst[2]:.4f})"
              f"; {sum(j[0] > 2 for j in jumps)} of {len(jumps)} steps over 2 points")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "data": args.data, "test": args.test, "ann_accuracy": ann,
                       "levels": args.levels, "rounding": args.rounding, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
