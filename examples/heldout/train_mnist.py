#!/usr/bin/env python
"""Train the held-out MNIST models: classifiers the defaults and the λ search were *not* tuned on (issue 16).

Never tune a default or the search on these models; report every change on them (examples/heldout/README.md).

Data: the MNIST t10k IDX files (the only MNIST release bundled), the project's split: images 0..7,999 train
(and calibrate), images 8,000..9,999 are the test split, never used for training or any choice (fixed epochs,
the last epoch is kept; the architectures and hyper-parameters were set before any conversion was run).

Models (``--only NAME``, repeatable), each with its own seed:

* ``avgpool_cnn``  seed 1. Plain MNIST in [0, 1] (pixels / 255, no mean/std normalisation, so the background is
  exactly 0): conv 3×3 (16) → avg pool → conv 3×3 (32) → avg pool → conv 3×3 (64) → avg pool → linear; every
  conv with BatchNorm and ReLU. Average pooling and a constant background: the model of issue 16's λ cliff.
  Its data is an .npz (``--write-npz DIR``), since ``mnist:DIR`` normalises.
* ``mlp``          seed 2. Normalised MNIST (``mnist:DIR``): 784 → 256 → 128 → 10, ReLU.
* ``gap_cnn``      seed 4. Normalised MNIST, so zero padding (0) differs from the background (−0.4242): conv 5×5
  (12) → max pool → conv 3×3 (24) → max pool → conv 3×3 (48) → global average pool → linear; BatchNorm, ReLU.
* ``vit``          seed 3. Normalised MNIST: timm ``vit_tiny_patch16_224`` with embed_dim 64, depth 2, 4 heads,
  patch 4, mlp_ratio 2 (the bundled mnist_vit has 48 / 3 / 3).

The training loop, export and file checks are examples/train.py's (``train``, ``save_all``: NAME.pt2 with a
dynamic batch, NAME.safetensors, NAME.json; each file under 2,000,000 bytes).

Usage:
  nice -n 10 .venv/bin/python examples/heldout/train_mnist.py                    # all four
  .venv/bin/python examples/heldout/train_mnist.py --only avgpool_cnn --write-npz /tmp/heldout
  .venv/bin/python examples/heldout/train_mnist.py --write-npz /tmp/heldout --only none   # data only
"""
from __future__ import annotations

import argparse
import gzip
import os
import sys

import numpy as np
import torch
import torch.nn as nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import train as base  # noqa: E402  (examples/train.py)

from sfn_deploy.data import MNIST_MEAN, MNIST_STD, Dataset, load_mnist  # noqa: E402

DEFAULT_OUT = os.path.join(os.path.dirname(HERE), "models", "heldout")
TRAIN, TEST = base.MNIST_TRAIN, base.MNIST_TEST          # [0, 8000), [8000, 10000)
MAX_FILE_BYTES = 2_000_000                                # decimal, as examples/train_cifar.py
NORMALISED_BG = (0.0 - MNIST_MEAN) / MNIST_STD


# --------------------------------------------------------------------------- data

def _idx(path: str) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_mnist01(directory: str, start: int, stop: int) -> Dataset:
    """MNIST t10k images start..stop-1 as pixels / 255 in [0, 1] (background exactly 0)."""
    x = _idx(os.path.join(directory, "t10k-images-idx3-ubyte.gz"))[start:stop].astype(np.float32) / 255.0
    y = _idx(os.path.join(directory, "t10k-labels-idx1-ubyte.gz"))[start:stop].astype(np.int64)
    return Dataset(torch.from_numpy(x[:, None].copy()), torch.from_numpy(y.copy()),
                   f"mnist01:{directory}[{start}:{stop}]")


def write_npz(directory: str, out: str) -> list[str]:
    """mnist01_train.npz (0..7,999) and mnist01_test.npz (8,000..9,999): x float32 N×1×28×28 in [0, 1], y int64."""
    os.makedirs(out, exist_ok=True)
    paths = []
    for part, (a, b) in (("train", TRAIN), ("test", TEST)):
        ds = load_mnist01(directory, a, b)
        path = os.path.join(out, f"mnist01_{part}.npz")
        np.savez(path, x=ds.x.numpy(), y=ds.y.numpy())
        paths.append(path)
    return paths


def split_record(normalised: bool) -> dict:
    spec = ("mnist:DIR:{}:{}" if normalised else "DIR/mnist01_{}.npz (examples/heldout/train_mnist.py "
            "--write-npz DIR)")
    fmt = (lambda a, b, part: spec.format(a, b)) if normalised else (lambda a, b, part: spec.format(part))
    return {"dataset": "MNIST t10k (IDX release files)",
            "input": ({"normalisation": {"mean": MNIST_MEAN, "std": MNIST_STD}} if normalised else
                      "pixels / 255 in [0, 1], no normalisation (background exactly 0)"),
            "train": {"indices": list(TRAIN), "n": TRAIN[1] - TRAIN[0], "spec": fmt(*TRAIN, "train")},
            "test": {"indices": list(TEST), "n": TEST[1] - TEST[0], "spec": fmt(*TEST, "test")},
            "note": "indices are [start, stop) into t10k-images-idx3-ubyte; the test part was not used for "
                    "training or any choice (fixed epochs, last epoch kept)"}


# --------------------------------------------------------------------------- architectures

def build_avgpool_cnn(c1: int = 16, c2: int = 32, c3: int = 64, num_classes: int = 10) -> nn.Sequential:
    """1×28×28 in [0, 1] → logits; average pooling only."""
    return nn.Sequential(
        nn.Conv2d(1, c1, 3, padding=1, bias=False), nn.BatchNorm2d(c1), nn.ReLU(),
        nn.AvgPool2d(2),                                                   # 14×14
        nn.Conv2d(c1, c2, 3, padding=1, bias=False), nn.BatchNorm2d(c2), nn.ReLU(),
        nn.AvgPool2d(2),                                                   # 7×7
        nn.Conv2d(c2, c3, 3, padding=1, bias=False), nn.BatchNorm2d(c3), nn.ReLU(),
        nn.AvgPool2d(2),                                                   # 3×3
        nn.Flatten(),
        nn.Linear(c3 * 9, num_classes),
    )


def build_mlp(hidden: tuple[int, ...] = (256, 128), num_classes: int = 10) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Flatten()]
    prev = 28 * 28
    for h in hidden:
        layers += [nn.Linear(prev, h), nn.ReLU()]
        prev = h
    layers.append(nn.Linear(prev, num_classes))
    return nn.Sequential(*layers)


def build_gap_cnn(c1: int = 12, c2: int = 24, c3: int = 48, num_classes: int = 10) -> nn.Sequential:
    """1×28×28 normalised → logits; max pooling, then a global average pool before the linear head."""
    return nn.Sequential(
        nn.Conv2d(1, c1, 5, padding=2, bias=False), nn.BatchNorm2d(c1), nn.ReLU(),
        nn.MaxPool2d(2),                                                   # 14×14
        nn.Conv2d(c1, c2, 3, padding=1, bias=False), nn.BatchNorm2d(c2), nn.ReLU(),
        nn.MaxPool2d(2),                                                   # 7×7
        nn.Conv2d(c2, c3, 3, padding=1, bias=False), nn.BatchNorm2d(c3), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(c3, num_classes),
    )


VIT_KWARGS = dict(num_classes=10, img_size=28, patch_size=4, in_chans=1, embed_dim=64, depth=2, num_heads=4,
                  mlp_ratio=2)

MODELS = {
    "avgpool_cnn": dict(seed=1, normalised=False, builder="examples/heldout/train_mnist.py:build_avgpool_cnn",
                        kwargs=dict(c1=16, c2=32, c3=64, num_classes=10),
                        train=dict(epochs=6, batch_size=64, lr=3e-3, weight_decay=5e-4, warmup_epochs=0.5,
                                   max_shift=2)),
    "mlp": dict(seed=2, normalised=True, builder="examples/heldout/train_mnist.py:build_mlp",
                kwargs=dict(hidden=[256, 128], num_classes=10),
                train=dict(epochs=8, batch_size=64, lr=2e-3, weight_decay=1e-4, warmup_epochs=0.5, max_shift=1)),
    "gap_cnn": dict(seed=4, normalised=True, builder="examples/heldout/train_mnist.py:build_gap_cnn",
                    kwargs=dict(c1=12, c2=24, c3=48, num_classes=10),
                    train=dict(epochs=6, batch_size=64, lr=3e-3, weight_decay=5e-4, warmup_epochs=0.5,
                               max_shift=2)),
    "vit": dict(seed=3, normalised=True, builder=f"timm.create_model({base.VIT_NAME!r}, pretrained=False, "
                                                 "**architecture)",
                kwargs=VIT_KWARGS,
                train=dict(epochs=14, batch_size=32, lr=2e-3, weight_decay=0.05, warmup_epochs=1, max_shift=1,
                           grad_clip=1.0)),
}


def build(name: str, kwargs: dict) -> nn.Module:
    if name == "avgpool_cnn":
        return build_avgpool_cnn(**kwargs)
    if name == "mlp":
        return build_mlp(tuple(kwargs["hidden"]), kwargs["num_classes"])
    if name == "gap_cnn":
        return build_gap_cnn(**kwargs)
    return base.build_mnist_vit(**kwargs)


# --------------------------------------------------------------------------- training

def run(name: str, args) -> dict:
    spec = MODELS[name]
    seed, normalised = spec["seed"] + 100 * args.seed_offset, spec["normalised"]
    torch.manual_seed(seed)
    base.SEED = seed                           # examples/train.py's shuffling and shift generator
    if normalised:
        tr, te = load_mnist(args.mnist, *TRAIN), load_mnist(args.mnist, *TEST)
    else:
        tr, te = load_mnist01(args.mnist, *TRAIN), load_mnist01(args.mnist, *TEST)
    model = build(name, spec["kwargs"])
    macs = base.weight_layer_macs(model, te.x)
    total = sum(m for _, m in macs)
    hp = dict(spec["train"], epochs=args.epochs.get(name, spec["train"]["epochs"]))
    fill = NORMALISED_BG if normalised else 0.0
    t = base.train(model, tr, te, shift_fill=fill, tag=name, **hp)
    acc = base.accuracy(model, te)
    meta = {"name": name, "heldout": "never tune defaults or the search on this model (examples/heldout/README.md)",
            "builder": spec["builder"], "architecture": spec["kwargs"], "input_shape": [1, 28, 28],
            "params": base.count_params(model), "split": split_record(normalised), "test_accuracy": acc,
            "epochs": hp["epochs"], "train_seconds": t["train_seconds"], "seed": seed,
            "command": "examples/heldout/train_mnist.py --only " + name,
            "macs_per_sample": {"weight_layers": total, "per_layer": dict(macs),
                                "note": "Conv2d/Linear only (attention matmuls not included)"},
            **{k: t[k] for k in ("optimizer", "augmentation", "history")}}
    if name == "vit":
        meta["timm_name"] = base.VIT_NAME
        meta["model_args"] = ",".join(f"{k}={v}" for k, v in VIT_KWARGS.items())
    else:
        meta["layers"] = [str(m) for m in model]
    sizes = base.save_all(name, model, te.x[:64], meta, args.out)
    for ext, s in sizes.items():
        if s >= MAX_FILE_BYTES:
            raise SystemExit(f"{name}.{ext}: {s} bytes, not under {MAX_FILE_BYTES:,} bytes")
    return {"model": name, "seed": seed, "params": meta["params"], "test_acc": acc, "epochs": hp["epochs"],
            "train_seconds": t["train_seconds"], "sizes": sizes}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", action="append", choices=[*MODELS, "none"], metavar="NAME",
                   help=f"train only this model (repeatable; one of {', '.join(MODELS)}; 'none' trains nothing)")
    p.add_argument("--out", default=DEFAULT_OUT, help="output directory (default: %(default)s)")
    p.add_argument("--mnist", default=base.DEFAULT_MNIST, help="directory with the MNIST t10k IDX files")
    p.add_argument("--epochs", action="append", default=[], metavar="NAME=N", help="override one model's epochs")
    p.add_argument("--write-npz", metavar="DIR",
                   help="also write DIR/mnist01_train.npz (0..7,999) and DIR/mnist01_test.npz (8,000..9,999), "
                        "pixels / 255 in [0, 1]: avgpool_cnn's data for the sfn-deploy CLI")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: %(default)s)")
    p.add_argument("--seed-offset", type=int, default=0,
                   help="K: train with each model's seed + 100·K, a fresh held-out set (write it with --out elsewhere)")
    args = p.parse_args(argv)
    args.epochs = {k: int(v) for k, v in (e.split("=", 1) for e in args.epochs)}
    torch.set_num_threads(args.threads)
    if args.write_npz:
        for path in write_npz(args.mnist, args.write_npz):
            print(f"wrote {path}")
    names = [n for n in dict.fromkeys(args.only or list(MODELS)) if n != "none"]
    results = [run(n, args) for n in names]
    for r in results:
        files = ", ".join(f"{ext} {s:,} B" for ext, s in r["sizes"].items())
        print(f"{r['model']:<12} seed {r['seed']}  params {r['params']:>8,}  epochs {r['epochs']:>3}  "
              f"test acc {100 * r['test_acc']:.2f}%  train {r['train_seconds']:.0f} s  {files}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
