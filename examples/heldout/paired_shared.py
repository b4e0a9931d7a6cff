#!/usr/bin/env python
"""Is a converted model really above the shared-λ curve? The paired test-split comparison of a converted model
(e.g. a `default_rows.sh --max-drop` point) with one shared λ (the paper's: analog input, no bias correction, the
calibration of `shared_sweep.py`): the accuracy difference, shared − converted, with Tango's paired 95 % interval.

The energy figure's reference ("the cheapest shared λ at least as accurate on the test split") is picked on the test
split itself from ~20 swept λ, so its accuracy carries the luck of that pick; this says whether the gap it shows is
larger than the split resolves (docs/benchmarks.md "Against the best shared λ on the test split").

    python examples/heldout/paired_shared.py --pair heldout3_vit /tmp/budget05/heldout3_vit_budget05.sfn.pt 0.175623
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import shared_sweep  # noqa: E402


def compare(name: str, converted: str, lam: float, mnist: str) -> dict:
    from sfn_deploy.data import load_data
    from sfn_deploy.evaluation import accuracy, measure, tango_interval
    from sfn_deploy.model_file import load
    from sfn_deploy.passes import set_scale

    model_path, calibration, test_spec = shared_sweep.rows_of_default_rows(mnist)[name]
    test = load_data(test_spec)
    mine, _ = measure(load(converted).graph, test)
    graph = shared_sweep.shared_graph(model_path, calibration)
    set_scale(graph, lam)
    shared, _ = measure(graph, test)
    ok_mine, ok_shared = mine == test.y, shared == test.y
    only_shared, only_mine = int((ok_shared & ~ok_mine).sum()), int((ok_mine & ~ok_shared).sum())
    low, high = tango_interval(only_shared, only_mine, len(test.y))
    return {"model": name, "converted": converted, "converted_acc": round(accuracy(mine, test.y), 2),
            "shared_lam": lam, "shared_acc": round(accuracy(shared, test.y), 2),
            "shared_minus_converted": round(100 * (only_shared - only_mine) / len(test.y), 2),
            "interval": [round(100 * low, 2), round(100 * high, 2)], "images": len(test.y)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pair", nargs=3, action="append", required=True, metavar=("ROW", "CONVERTED", "LAM"),
                    help="a row name of examples/heldout/models.txt, its converted model, the shared λ")
    ap.add_argument("--mnist", default=os.path.join(shared_sweep.ROOT, "..", "shared", "data", "mnist"))
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    import torch
    torch.set_num_threads(args.threads)
    for name, converted, lam in args.pair:
        print(json.dumps(compare(name, converted, float(lam), args.mnist)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
