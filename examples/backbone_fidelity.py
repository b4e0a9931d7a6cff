#!/usr/bin/env python
"""Output fidelity on a trained backbone (docs/concepts.md "Fidelity"; issue 15, non-classifier outputs).

The held-out CIFAR ResNet-20 (examples/models/cifar35/, never tuned on) without its linear head is a backbone
returning 64 pooled features. It is converted on unlabeled images (``--fidelity`` auto → output: the search
scores the cosine similarity of the SNN's features with the ANN's), then measured on held-out images: the mean
cosine, and what a consumer of the features sees — the trained head applied to the SNN's features against the
same head on the ANN's (top-1 agreement and accuracy).

Usage (the splits: examples/heldout/README.md, ``train_cifar.write_splits``):
  .venv/bin/python examples/backbone_fidelity.py --splits /tmp/cifar_splits --out /tmp/backbone [--max-drop 1]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np
import torch
from safetensors.torch import load_file

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "architectures"))
from resnet_cifar import resnet20  # noqa: E402

CLI = os.path.join(os.path.dirname(HERE), ".venv", "bin", "sfn-deploy")


class Backbone(torch.nn.Module):
    def __init__(self, net):
        super().__init__()
        self.stem, self.layers = net.stem, net.layers

    def forward(self, x):
        return torch.nn.functional.adaptive_avg_pool2d(self.layers(self.stem(x)), 1).flatten(1)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--splits", default="/tmp/cifar_splits")
    p.add_argument("--out", default="/tmp/backbone")
    p.add_argument("--max-drop", type=float, default=None, help="budget in points of 100·cosine")
    p.add_argument("--trials", type=int, default=30)
    p.add_argument("--test", type=int, default=2000, help="held-out images measured")
    a = p.parse_args()
    os.makedirs(a.out, exist_ok=True)
    net = resnet20().eval()
    net.load_state_dict(load_file(os.path.join(HERE, "models", "cifar35", "resnet20.safetensors")))
    backbone = Backbone(net).eval()
    ep = torch.export.export(backbone, (torch.zeros(2, 3, 32, 32),),
                             dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},))
    model = os.path.join(a.out, "resnet20_backbone.pt2")
    torch.export.save(ep, model)
    calib = np.load(os.path.join(a.splits, "cifar10_calib1k.npz"))
    unlabeled = os.path.join(a.out, "calib1k_unlabeled.npz")
    np.savez(unlabeled, x=calib["x"])                      # no y: unlabeled
    held = np.load(os.path.join(a.splits, "cifar10_heldout.npz"))
    idx = np.random.RandomState(0).permutation(len(held["y"]))[:a.test]
    test = os.path.join(a.out, "heldout_unlabeled.npz")
    np.savez(test, x=held["x"][idx])
    out = os.path.join(a.out, "backbone.sfn.pt")
    # auto reads it as a backbone too (unlabeled data, no weight layer at the output); said here for the record
    cmd = [CLI, "convert", model, "--data", unlabeled, "--fidelity", "output", "--trials", str(a.trials), "-o", out,
           "--json"]
    if a.max_drop is not None:
        cmd += ["--max-drop", str(a.max_drop)]
    conv = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    ev = json.loads(subprocess.run([CLI, "evaluate", out, "--data", test, "--json"], check=True,
                                   capture_output=True, text=True).stdout)
    from sfn_deploy.model_file import load
    from sfn_deploy.simulators.interpreter import run
    g = load(out).graph
    x, y = torch.from_numpy(held["x"][idx]), torch.from_numpy(held["y"][idx])
    with torch.no_grad():
        ann = torch.cat([run(g, x[i:i + 250], spiking=False) for i in range(0, len(x), 250)])
        snn = torch.cat([run(g, x[i:i + 250], spiking=True) for i in range(0, len(x), 250)])
        head_ann, head_snn = net.head(ann).argmax(-1), net.head(snn).argmax(-1)
    row = {"model": "cifar35_resnet20_backbone", "max_drop": a.max_drop, "trials": a.trials,
           "lam": conv["lam"], "val_cosine": round(conv["cosine"], 5), "test_images": len(y),
           "test_cosine": round(ev["cosine"], 5), "test_relative_error": round(ev["relative_error"], 2),
           "energy_ratio": round(ev["energy_ratio"], 4),
           "head_agreement": round(100 * float((head_ann == head_snn).float().mean()), 2),
           "head_accuracy_ann": round(100 * float((head_ann == y).float().mean()), 2),
           "head_accuracy_snn": round(100 * float((head_snn == y).float().mean()), 2)}
    print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
