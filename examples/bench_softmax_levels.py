#!/usr/bin/env python
"""Post-softmax levels: the fire function's own (the paper's) against dense (every integer up to the top level),
at fixed λ, on one model (docs/benchmarks.md "Post-softmax levels"; docs/concepts.md "The neuron").

Calibrates on a seeded random ``--calib`` images of ``--data`` (``convert``'s passes at λ = 1), then for each
``--softmax-levels`` mode and λ sets the scale and measures top-1 accuracy, agreement with the ANN and the energy
ratio on a seeded random ``--test`` images of ``--test-data`` (``evaluate``'s counting). One JSON row each.

    python examples/bench_softmax_levels.py examples/models/mnist_vit.pt2 \\
        --data mnist:/work/shared/data/mnist:0:8000 --test-data mnist:/work/shared/data/mnist:8000:10000
"""
from __future__ import annotations

import argparse
import json

import torch

from sfn_deploy.config import load_config
from sfn_deploy.convert import build_graph
from sfn_deploy.data import load_data
from sfn_deploy.evaluation import accuracy, energy_constants, measure
from sfn_deploy.models import load_model
from sfn_deploy.passes import set_scale


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--data", required=True, help="calibration images (a --data form)")
    ap.add_argument("--test-data", required=True, help="test images (a --data form)")
    ap.add_argument("--calib", type=int, default=2000)
    ap.add_argument("--test", type=int, default=2000)
    ap.add_argument("--lam", default="0.1,0.15,0.2,0.3")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, _ = load_model(args.model)
    test = load_data(args.test_data)
    test = test.sample(min(args.test, len(test)), 1)
    calib = load_data(args.data)
    calib = calib.sample(min(args.calib, len(calib)), 0)
    e = energy_constants()
    for mode in ("fire", "dense"):
        cfg = load_config("", {"scale": 1.0, "softmax_levels": mode})
        graph = build_graph(model, calib, cfg, quiet=True)
        ann_pred, _ = measure(graph, test, spiking=False)
        for lam in map(float, args.lam.split(",")):
            set_scale(graph, lam)
            pred, counter = measure(graph, test)
            print(json.dumps({"model": args.model, "softmax_levels": mode, "lam": lam,
                              "ann": round(accuracy(ann_pred, test.y), 2), "snn": round(accuracy(pred, test.y), 2),
                              "agreement": round(100 * float((pred == ann_pred).float().mean()), 2),
                              "energy_ratio": round(counter.result().energy_ratio(*e), 4)}), flush=True)


if __name__ == "__main__":
    main()
