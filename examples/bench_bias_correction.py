"""Does bias correction (sfn_deploy/bias_correction.py) help? Issue 16 keeps a training-free knob only if it helps
on held-out models (examples/heldout/README.md); this measures it there and on the bundled models.

Per model and per λ of a grid fixed in advance (not tuned on these models): convert at that λ on the calibration
images (``--bias-correction off``), evaluate the SNN on the test split, evaluate again with each weight layer's
mean SNN − ANN shift folded into the SNN's bias (``bias_correction.shifts`` on 256 of the calibration images, the
layers corrected in graph order; the ANN keeps the source bias). Rows: ANN and SNN test accuracy and top-1
agreement with the ANN before and after, the drop, the energy ratio. Calibration and test images are seeded random
samples of the splits.

    python examples/bench_bias_correction.py --json results.jsonl     # every model below
    python examples/bench_bias_correction.py heldout/mlp --lam 0.2

examples/bench_bias_correction_results.jsonl holds the rows of commit df5f871, which also measured a rejected
variant (``*_corrected``: each site's own mean error, folded in one pass) beside this one (``*_seq``).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from sfn_deploy import bias_correction, convert  # noqa: E402
from sfn_deploy.data import load_data  # noqa: E402
from sfn_deploy.evaluation import measure  # noqa: E402
from sfn_deploy.models import load_model  # noqa: E402
from sfn_deploy.passes import set_scale  # noqa: E402

MNIST = os.environ.get("SFN_MNIST", os.path.join(HERE, "..", "..", "shared", "data", "mnist"))
SPLITS = "/tmp/cifar_splits"          # examples/train_cifar.py --write-splits
NPZ01 = "/tmp/heldout"                # examples/heldout/train_mnist.py --write-npz
HELDOUT_DIR: list[str | None] = [None]
MODELS = {   # name: (file, calibration data, test data); the last two are the bundled (tuned-on) models
    "heldout/avgpool_cnn": ("heldout/avgpool_cnn.pt2", f"{NPZ01}/mnist01_train.npz", f"{NPZ01}/mnist01_test.npz"),
    "heldout/mlp": ("heldout/mlp.pt2", f"mnist:{MNIST}:0:8000", f"mnist:{MNIST}:8000:10000"),
    "heldout/gap_cnn": ("heldout/gap_cnn.pt2", f"mnist:{MNIST}:0:8000", f"mnist:{MNIST}:8000:10000"),
    "heldout/vit": ("heldout/vit.pt2", f"mnist:{MNIST}:0:8000", f"mnist:{MNIST}:8000:10000"),
    "cifar/resnet20": ("cifar/resnet20.pt2", f"{SPLITS}/cifar10_calib4k.npz", f"{SPLITS}/cifar10_heldout.npz"),
    "cifar/mobilenetv2": ("cifar/mobilenetv2.pt2", f"{SPLITS}/cifar10_calib4k.npz", f"{SPLITS}/cifar10_heldout.npz"),
    "cifar/efficientnet": ("cifar/efficientnet.pt2", f"{SPLITS}/cifar10_calib4k.npz",
                           f"{SPLITS}/cifar10_heldout.npz"),
    "cifar/vit": ("cifar/vit.pt2", f"{SPLITS}/cifar10_calib4k.npz", f"{SPLITS}/cifar10_heldout.npz"),
    "tuning/mnist_cnn": ("mnist_cnn.pt2", f"mnist:{MNIST}:0:8000", f"mnist:{MNIST}:8000:10000"),
    "tuning/mnist_vit": ("mnist_vit.pt2", f"mnist:{MNIST}:0:8000", f"mnist:{MNIST}:8000:10000"),
}


def _acc(pred: torch.Tensor, y: torch.Tensor) -> float:
    return round(100.0 * float((pred == y).float().mean()), 2)


def bench(name: str, lams: list[float], calib: int, test: int, batch: int) -> list[dict]:
    path, calib_spec, test_spec = MODELS[name]
    where = os.path.join(HERE, "models", path)
    if HELDOUT_DIR[0] and name.startswith("heldout/"):
        where = os.path.join(HELDOUT_DIR[0], os.path.basename(path))
    net, ident = load_model(where)
    cal = load_data(calib_spec).sample(calib, seed=0)      # seeded random: the CIFAR .npz files are class-sorted
    tst = load_data(test_spec).sample(test, seed=0)
    snn = convert(net, cal, scale=lams[0], source=ident, batch_size=batch, bias_correction="off")
    graph = snn.graph
    ann, _ = measure(graph, tst, batch, spiking=False)
    rows = []
    for lam in lams:
        set_scale(graph, lam)
        t0 = time.perf_counter()
        before, c0 = measure(graph, tst, batch)
        fixed = copy.deepcopy(graph)
        shifts = bias_correction.shifts(fixed, cal.head(bias_correction.IMAGES))
        bias_correction.apply(fixed, shifts)
        after, c1 = measure(fixed, tst, batch)
        y = tst.y
        rows.append({
            "model": name, "lam": lam, "calib": len(cal), "test": len(tst), "ann": _acc(ann, y),
            "snn": _acc(before, y), "snn_corrected": _acc(after, y),
            "drop": round(_acc(ann, y) - _acc(before, y), 2), "drop_corrected": round(_acc(ann, y) - _acc(after, y), 2),
            "agree": _acc(before, ann), "agree_corrected": _acc(after, ann),
            "energy": round(c0.result().energy_ratio(), 4), "energy_corrected": round(c1.result().energy_ratio(), 4),
            "layers_corrected": sum(1 for n in fixed.nodes if "bias_ann" in n.params), "sites": len(graph.sites),
            "max_abs_shift": round(max((float(s.abs().max()) for s in shifts.values()), default=0.0), 5),
            "seconds": round(time.perf_counter() - t0, 1)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="*", default=list(MODELS))
    ap.add_argument("--lam", type=float, action="append", default=None, help="λ grid (default 0.1, 0.2, 0.35)")
    ap.add_argument("--calib", type=int, default=2000)
    ap.add_argument("--test", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=250)
    ap.add_argument("--json", default=None, help="append the rows to this file")
    ap.add_argument("--heldout-dir", default=None,
                    help="read the heldout/* models from here (a fresh set: train_mnist.py --seed-offset K --out DIR)")
    args = ap.parse_args()
    torch.manual_seed(0)
    HELDOUT_DIR[0] = args.heldout_dir
    for name in args.models:
        rows = bench(name, args.lam or [0.1, 0.2, 0.35], args.calib, args.test, args.batch_size)
        if args.json:
            with open(args.json, "a") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)


if __name__ == "__main__":
    main()
