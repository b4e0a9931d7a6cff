"""Lava fixed point against the integer reference, on held-out CIFAR-10 images (docs/lava.md, "Measured in Lava").

    .venv/bin/python examples/lava_integer_reference.py --out /tmp/lava_ref                  # the three models
    .venv/bin/python examples/lava_integer_reference.py --out /tmp/lava_ref resnet20 --n 20  # one, 20 images
    .venv/bin/python examples/lava_integer_reference.py --cnn-families >> rows.jsonl        # every CNN family

For each model: calibration on 256 CIFAR-10 training images (file k of every class in turn, k = 0…25, as
``examples/zoo.py``'s ``cifar()``), conversion at a fixed λ (``--scale``, default 0.5; no search), then one
Lava run in fixed point (graded lowering, split weights) on N held-out images (files 1600… of every class in
turn: the trained models' held-out split), recording every site's levels. Printed per model: Lava against the
integer reference (``exporters/lava/reference.py``; top-1 agreement, levels equal, largest logit difference),
the integer reference against the float torch SNN (top-1, levels), Lava against the float SNN, the accuracies,
Lava's counters and the reference's float32-exactness certificate. ``--out`` keeps the converted models and the
data as ``.npz``, so the CLI gives the same figures:

    sfn-deploy simulate OUT/resnet20.sfn.pt --data OUT/heldout32.npz --backend lava --precision fixed_pt [--per-layer]

Models: ``resnet20`` and ``mobilenetv2`` (trained, ``examples/models/cifar/``), or a zoo name (random weights,
``examples/zoo.py``; e.g. ``resnet18``, at the zoo's input size).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CIFAR = os.path.join(ROOT, "..", "shared", "data", "cifar10", "train")
TRAINED = ("resnet20", "mobilenetv2")
# the coverage table's rows (examples/zoo.py ZOO) that are not CNN families: every other row is one, for issue 15's
# "every CNN family runs in Lava fixed point" (docs/lava.md, "Every CNN family of the coverage table")
NOT_CNN = ("mixer_b16_224", "resmlp_12_224", "deit_tiny_patch16_224", "deit_tiny_distilled_patch16_224",
           "vit_small_patch16_224", "swin_tiny_patch4_window7_224", "levit_128s", "efficientformer_l1",
           "mobilevit_xxs", "cait_xxs24_224", "eva02_tiny_patch14_224")


def cnn_families() -> list[str]:
    sys.path.insert(0, HERE)
    import zoo
    return [name for name in zoo.ZOO if name not in NOT_CNN]


def images(start: int, n: int, size: int):
    """n CIFAR-10 images in [0, 1] at size×size: file start + k of every class folder in turn, k = 0, 1, …"""
    import torch
    import torch.nn.functional as F
    from PIL import Image

    from sfn_deploy.data import Dataset
    classes = sorted(os.listdir(CIFAR))
    files = [(os.path.join(CIFAR, c, f"{start + k:04d}.jpg"), i) for k in range(n // len(classes) + 1)
             for i, c in enumerate(classes)][:n]
    x = torch.from_numpy(np.stack([np.asarray(Image.open(p).convert("RGB"), np.float32).transpose(2, 0, 1) / 255.0
                                   for p, _ in files]))
    if size != x.shape[-1]:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).contiguous()
    return Dataset(x, torch.tensor([c for _, c in files]), f"cifar10[{start}:+{n}]")


def model_for(name: str):
    if name in TRAINED:
        from sfn_deploy.models import load_model
        model, ident = load_model(os.path.join(HERE, "models", "cifar", f"{name}.pt2"))
        return model, 32, ident
    sys.path.insert(0, HERE)
    import zoo
    model, size = zoo.build(name)
    return model, size, None


def measure(name: str, n: int, out: str | None, scale: float = 0.5) -> dict:
    from sfn_deploy.convert import convert
    from sfn_deploy.exporters.lava import BACKEND as LAVA
    from sfn_deploy.torch_backend import BACKEND as TORCH
    model, size, ident = model_for(name)
    calib, test = images(0, 256, size), images(1600, n, size)
    snn = convert(model, calib, scale=scale, quiet=True, **({"source": ident} if ident else {}))
    if out:
        from sfn_deploy.model_file import save
        os.makedirs(out, exist_ok=True)
        save(snn, os.path.join(out, f"{name}{'' if scale == 0.5 else f'_lam{scale:g}'}.sfn.pt"))
        np.savez(os.path.join(out, f"heldout{size}.npz"), x=test.x.numpy(), y=test.y.numpy())
    opts = {"precision": "fixed_pt", "lowering": "graded", "input_abs_max": snn.metrics.get("input_abs_max")}
    t0 = time.perf_counter()
    lava = LAVA.layers(snn, test.x, 256, opts)
    seconds = time.perf_counter() - t0
    ref, flt = lava["references"]["integer-reference"], TORCH.layers(snn, test.x, 256)
    y = test.y.numpy()

    def top1(a, b):
        return 100.0 * float((a["outputs"].reshape(n, -1).argmax(1) == b["outputs"].reshape(n, -1).argmax(1)).mean())

    def levels(a, b):
        eq = sum(int((a["levels"][s.name] == b["levels"][s.name]).sum()) for s in snn.sites)
        return 100.0 * eq / sum(a["levels"][s.name].size for s in snn.sites)

    def acc(a):
        return 100.0 * float((a["outputs"].reshape(n, -1).argmax(1) == y).mean())
    counts = lava["counts"]
    return {"model": name, "lambda": scale, "images": n, "lava_vs_reference": top1(lava, ref),
            "levels_lava_vs_reference": levels(lava, ref),
            "logits_max_abs_diff": float(np.abs(lava["outputs"] - ref["outputs"]).max()),
            "reference_vs_snn": top1(ref, flt), "levels_reference_vs_snn": levels(ref, flt),
            "lava_vs_snn": top1(lava, flt), "accuracy_snn": acc(flt), "accuracy_reference": acc(ref),
            "accuracy_lava": acc(lava), "float32_exact": ref["float32_exact"],
            "largest_sum_bits": float(np.log2(max(ref["largest_sum"], 1.0))),
            "overflows_saturations_wraps": int(sum(sum(v) for v in counts.values())),
            "snn_classes_predicted": int(len(np.unique(flt["outputs"].reshape(n, -1).argmax(1)))),
            "lava_seconds": seconds}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("models", nargs="*", default=["resnet20", "mobilenetv2", "resnet18"])
    ap.add_argument("--cnn-families", action="store_true",
                    help="run every CNN family of the zoo's coverage table (random weights) instead")
    ap.add_argument("--n", type=int, default=200, help="held-out images (default 200)")
    ap.add_argument("--out", default=None, help="keep the converted models and the data here")
    ap.add_argument("--scale", type=float, default=0.5, help="λ of the conversion (default 0.5)")
    args = ap.parse_args(argv)
    import torch
    torch.set_num_threads(2)
    for name in cnn_families() if args.cnn_families else args.models:
        print(json.dumps(measure(name, args.n, args.out, args.scale)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
