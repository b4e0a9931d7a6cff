#!/usr/bin/env python
"""Train small CIFAR-10 classifiers of five families, for measuring SNN fidelity on trained models (issue 15).

Data: ``../shared/data/cifar10/train/CLASS/NNNN.jpg`` (10 classes × 2,000 JPEGs, 32×32 RGB). Fixed split by
file number, the same in every class:

* training part: files 0000–1599 of every class (16,000 images) — training, and calibration for conversion;
* held-out part: files 1600–1999 of every class (4,000 images) — only for the accuracies reported.

The held-out part is never used for training, model selection or conversion settings: every model trains
for a fixed wall-clock budget (``--budget-minutes``, the cosine schedule spans it) and the last step is kept.

Inputs are raw pixels in [0, 1] (RGB, /255, as ``sfn-deploy --data FOLDER`` reads images), with no mean/std
normalisation: the first convolution (followed by BatchNorm, or a patch embedding) absorbs the scale.

Models (``--only NAME``, repeatable):

* ``resnet20``      CIFAR ResNet-20, parameter-free subsample + zero-pad shortcuts (architectures/resnet_cifar.py)
* ``mobilenetv2``   MobileNetV2-style: inverted residuals, depthwise 3×3, ReLU6 (architectures/mobile_cifar.py)
* ``efficientnet``  EfficientNet-style MBConv: SiLU, squeeze-and-excitation with a sigmoid gate (mobile_cifar.py)
* ``convnext``      timm ConvNeXt (depthwise 7×7, LayerNorm2d / channels-last LayerNorm, GELU, layer scale),
                    patch-2 stem, 4 stages (16×16 → 2×2)
* ``vit``           timm VisionTransformer (``vit_tiny_patch16_224`` constructor, img_size 32, patch 4)

Augmentation: torchvision ``RandomCrop(32, padding=4)`` and ``RandomHorizontalFlip()`` per image, in a
torch DataLoader. For each model NAME the script writes NAME.pt2 (torch.export, dynamic batch 1..1024),
NAME.safetensors and NAME.json (command, split, epochs, seed, held-out accuracy, …) to ``--out`` when the
checkpoint is under 2 MiB (the limit of examples/train.py), otherwise to ``--big-out`` (default
/tmp/sfn_cifar_models, not for git).

``--write-splits DIR`` also writes the two parts as .npz files for the sfn-deploy CLI:
``DIR/cifar10_train.npz`` (16,000), ``DIR/cifar10_heldout.npz`` (4,000), ``DIR/cifar10_calib4k.npz`` (files
0000–0399 of every class) and ``DIR/cifar10_calib1k.npz`` (files 0000–0099 of every class), both inside the
training part: ``x`` float32 N×3×32×32 in [0, 1], ``y`` int64, class by class.

Usage:
  nice -n 10 .venv/bin/python examples/train_cifar.py --only resnet20 --write-splits /tmp
"""
from __future__ import annotations

import argparse
import math
import os
import shlex
import sys
import time
import warnings

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from architectures.mobile_cifar import efficientnet_cifar, mobilenetv2_cifar  # noqa: E402
from architectures.resnet_cifar import resnet20  # noqa: E402
from train import count_params, save_all, weight_layer_macs  # noqa: E402

DEFAULT_DATA = os.environ.get("SFN_CIFAR10_DIR", "/work/shared/data/cifar10/train")
DEFAULT_OUT = os.path.join(HERE, "models", "cifar")
DEFAULT_BIG_OUT = "/tmp/sfn_cifar_models"
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
TRAIN_FILES = (0, 1600)          # [start, stop) of NNNN in every class folder
HELDOUT_FILES = (1600, 2000)
CALIB_FILES = (0, 400)           # subsets of the training part, for quick calibration files
CALIB1K_FILES = (0, 100)
MAX_FILE_BYTES = 2_000_000             # the project bundles checkpoints under 2 MB each
SEED = 0
warnings.filterwarnings("ignore", message="The given buffer is not writable")


# --------------------------------------------------------------------------- models

def build_convnext(num_classes: int = 10, **kw) -> nn.Module:
    import timm
    return timm.create_model("convnext_atto", pretrained=False, num_classes=num_classes, **kw)


def build_vit(num_classes: int = 10, **kw) -> nn.Module:
    import timm
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=num_classes, **kw)


# name → (builder, builder kwargs, training hyper-parameters). Training length is a wall-clock budget
# (--budget-minutes, default 10, inside the 12-minute time box of issue 15's task), not a number of epochs: on
# the shared 2-core machine a ResNet-20 epoch took 120 s to 450 s depending on other engineers' test runs, so a
# fixed epoch count either overran the box or stopped with the learning rate still high. "epochs" is only an
# upper bound. Far from convergence; nothing was tuned on the held-out images.
SGD = dict(optimizer="sgd", lr=0.05, momentum=0.9, weight_decay=5e-4, batch_size=64, warmup_epochs=0.2)
ADAMW = dict(optimizer="adamw", lr=2e-3, weight_decay=0.05, batch_size=64, warmup_epochs=0.3, grad_clip=1.0)
MODELS = {
    "resnet20": (resnet20, {}, dict(SGD, epochs=100)),
    "mobilenetv2": (mobilenetv2_cifar, {}, dict(SGD, epochs=100, weight_decay=1e-4)),
    "efficientnet": (efficientnet_cifar, {}, dict(SGD, epochs=100, weight_decay=1e-4)),
    "convnext": (build_convnext, dict(depths=(1, 1, 2, 1), dims=(32, 64, 96, 128), patch_size=2, ls_init_value=0.1),
                 dict(ADAMW, epochs=100)),
    "vit": (build_vit, dict(img_size=32, patch_size=4, embed_dim=96, depth=5, num_heads=3, mlp_ratio=2),
            dict(ADAMW, epochs=100, lr=1e-3)),
}
BUILDER_NAMES = {
    "resnet20": "examples/architectures/resnet_cifar.py:resnet20",
    "mobilenetv2": "examples/architectures/mobile_cifar.py:mobilenetv2_cifar",
    "efficientnet": "examples/architectures/mobile_cifar.py:efficientnet_cifar",
    "convnext": "timm.create_model('convnext_atto', pretrained=False, num_classes=10, **architecture)",
    "vit": "timm.create_model('vit_tiny_patch16_224', pretrained=False, num_classes=10, **architecture)",
}


# --------------------------------------------------------------------------- data

def load_cifar_files(root: str, files: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """uint8 N×3×32×32 and int64 labels for files [start, stop) of every class, class by class."""
    from PIL import Image
    xs, ys = [], []
    for label, cls in enumerate(CLASSES):
        for i in range(*files):
            with Image.open(os.path.join(root, cls, f"{i:04d}.jpg")) as im:
                xs.append(np.asarray(im.convert("RGB"), dtype=np.uint8).transpose(2, 0, 1))
            ys.append(label)
    return np.stack(xs), np.array(ys, dtype=np.int64)


class AugmentedImages(torch.utils.data.Dataset):
    def __init__(self, x: np.ndarray, y: np.ndarray, train: bool):
        from torchvision import transforms
        self.x, self.y = torch.from_numpy(x), torch.from_numpy(y)
        self.tf = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip()]) \
            if train else None

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i):
        x = self.x[i]
        if self.tf is not None:
            x = self.tf(x)
        return x.float() / 255.0, self.y[i]


def write_splits(root: str, out_dir: str) -> dict:
    os.makedirs(out_dir, exist_ok=True)
    written = {}
    for name, files in (("cifar10_train", TRAIN_FILES), ("cifar10_heldout", HELDOUT_FILES),
                        ("cifar10_calib4k", CALIB_FILES), ("cifar10_calib1k", CALIB1K_FILES)):
        x, y = load_cifar_files(root, files)
        path = os.path.join(out_dir, f"{name}.npz")
        np.savez(path, x=x.astype(np.float32) / 255.0, y=y)
        written[name] = {"path": path, "files": f"{files[0]:04d}-{files[1] - 1:04d} of every class", "n": len(y)}
        print(f"  wrote {path}: {len(y)} images (files {files[0]:04d}-{files[1] - 1:04d} of every class)")
    return written


# --------------------------------------------------------------------------- training

@torch.no_grad()
def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray, batch: int = 500) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(y), batch):
        xb = torch.from_numpy(x[i:i + batch]).float() / 255.0
        correct += int((model(xb).argmax(1) == torch.from_numpy(y[i:i + batch])).sum())
    return correct / len(y)


def make_optimizer(model: nn.Module, hp: dict) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        (no_decay if p.ndim <= 1 or n.endswith(("pos_embed", "cls_token", "gamma")) else decay).append(p)
    groups = [{"params": decay, "weight_decay": hp["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}]
    if hp["optimizer"] == "sgd":
        return torch.optim.SGD(groups, lr=hp["lr"], momentum=hp["momentum"], nesterov=True)
    return torch.optim.AdamW(groups, lr=hp["lr"])


def train(model: nn.Module, x: np.ndarray, y: np.ndarray, hp: dict, budget_minutes: float, tag: str,
          seed: int = SEED) -> dict:
    """SGD/AdamW with a time-budgeted schedule: linear warm-up over the first ``warmup_epochs``, then a cosine
    from the peak learning rate to 0 over the wall-clock budget; training stops when the budget is spent (or
    after ``hp['epochs']`` epochs, whichever comes first). On a shared CPU the number of steps therefore
    depends on the machine's load; it is recorded, and the schedule always ends annealed."""
    gen = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(AugmentedImages(x, y, train=True), batch_size=hp["batch_size"],
                                         shuffle=True, drop_last=True, num_workers=0, generator=gen)
    opt = make_optimizer(model, hp)
    steps_per_epoch = len(loader)
    warm = max(1, int(hp["warmup_epochs"] * steps_per_epoch))
    budget = budget_minutes * 60.0
    peak = [g["lr"] for g in opt.param_groups]
    history, t_start, step, done = [], time.perf_counter(), 0, False
    for epoch in range(1, hp["epochs"] + 1):
        model.train()
        loss_sum = correct = seen = 0
        for xb, yb in loader:
            elapsed = time.perf_counter() - t_start
            if elapsed >= budget:
                done = True
                break
            if step < warm:
                factor = (step + 1) / warm
                t_warm_end = elapsed
            else:
                frac = (elapsed - t_warm_end) / max(1e-9, budget - t_warm_end)
                factor = 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))
            for g, lr in zip(opt.param_groups, peak, strict=True):
                g["lr"] = lr * factor
            logits = model(xb)
            loss = F.cross_entropy(logits, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if hp.get("grad_clip"):
                nn.utils.clip_grad_norm_(model.parameters(), hp["grad_clip"])
            opt.step()
            step += 1
            loss_sum += float(loss.detach()) * len(yb)
            correct += int((logits.argmax(1) == yb).sum())
            seen += len(yb)
        if seen:
            elapsed = time.perf_counter() - t_start
            history.append({"epoch": epoch, "steps": step, "loss": round(loss_sum / seen, 4),
                            "train_acc": round(correct / seen, 4), "seconds": round(elapsed, 1)})
            print(f"  [{tag}] epoch {epoch:3d}  steps {step}  loss {loss_sum / seen:.4f}  "
                  f"train acc {correct / seen:.4f}  ({elapsed:.0f}s)", flush=True)
        if done:
            break
    return {"history": history, "train_seconds": round(time.perf_counter() - t_start, 1), "steps": step,
            "epochs_run": round(step / steps_per_epoch, 2), "steps_per_epoch": steps_per_epoch}


def run(name: str, args, data: dict) -> dict:
    torch.manual_seed(args.seed)
    builder, arch, hp = MODELS[name]
    hp = dict(hp)
    if name in args.epochs:
        hp["epochs"] = args.epochs[name]
    model = builder(**arch)
    params = count_params(model)
    xtr, ytr, xte, yte = data["train_x"], data["train_y"], data["heldout_x"], data["heldout_y"]
    example = torch.from_numpy(xte[:64]).float() / 255.0
    macs = weight_layer_macs(model, example)
    print(f"== {name}: {params:,} parameters, {sum(m for _, m in macs):,} Conv/Linear MACs per image", flush=True)
    t = train(model, xtr, ytr, hp, args.budget_minutes, name, args.seed)
    acc = accuracy(model, xte, yte)
    print(f"  [{name}] held-out accuracy {acc:.4f}", flush=True)
    big = params * 4 > 0.9 * MAX_FILE_BYTES
    out_dir = args.big_out if big else args.out
    meta = {
        "name": name, "builder": BUILDER_NAMES[name], "architecture": {k: list(v) if isinstance(v, tuple) else v
                                                                      for k, v in arch.items()},
        "input_shape": [3, 32, 32], "input": "RGB pixels / 255 in [0, 1], no mean/std normalisation",
        "params": params, "macs_per_sample": {"conv_linear": sum(m for _, m in macs),
                                              "note": "Conv2d/Linear only (attention matmuls not included)"},
        "command": "nice -n 10 .venv/bin/python " + " ".join(shlex.quote(a) for a in sys.argv),
        "split": {"dataset": "shared/data/cifar10/train (first 2,000 per class of the CIFAR-10 training set, JPEG)",
                  "train": {"files": f"{TRAIN_FILES[0]:04d}-{TRAIN_FILES[1] - 1:04d} of every class", "n": len(ytr)},
                  "heldout": {"files": f"{HELDOUT_FILES[0]:04d}-{HELDOUT_FILES[1] - 1:04d} of every class",
                              "n": len(yte)},
                  "note": "held-out images used only for the accuracy below (fixed epochs, last epoch kept)"},
        "heldout_accuracy": acc, "epochs": t["epochs_run"], "steps": t["steps"],
        "steps_per_epoch": t["steps_per_epoch"], "budget_minutes": args.budget_minutes,
        "max_epochs": hp["epochs"], "train_seconds": t["train_seconds"],
        "seed": args.seed, "training": {k: v for k, v in hp.items() if k != "epochs"},
        "augmentation": "torchvision RandomCrop(32, padding=4), RandomHorizontalFlip() per image",
        "schedule": "linear warm-up (warmup_epochs), then cosine to 0 over the wall-clock budget, per step; "
                    "stop when the budget is spent", "history": t["history"],
        "torch_threads": torch.get_num_threads(),
    }
    if big:
        meta["not_bundled"] = f"{params:,} parameters: over the 2 MB limit for checkpoints in git; written to {out_dir}"
    sizes = save_all(name, model, example, meta, out_dir) if not big else save_big(name, model, example, meta, out_dir)
    return {"model": name, "params": params, "acc": acc, "epochs": t["epochs_run"], "seconds": t["train_seconds"],
            "dir": out_dir, "sizes": sizes}


def save_big(name, model, example, meta, out_dir):
    import train as _train
    old, _train.MAX_FILE_BYTES = _train.MAX_FILE_BYTES, float("inf")
    try:
        return save_all(name, model, example, meta, out_dir)
    finally:
        _train.MAX_FILE_BYTES = old


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", action="append", choices=sorted(MODELS), metavar="NAME",
                   help=f"train only this model (repeatable; one of {', '.join(MODELS)})")
    p.add_argument("--data", default=DEFAULT_DATA, help="CIFAR-10 class folders (default: %(default)s)")
    p.add_argument("--out", default=DEFAULT_OUT, help="output for checkpoints under 2 MB (default: %(default)s)")
    p.add_argument("--big-out", default=DEFAULT_BIG_OUT, help="output for larger ones (default: %(default)s)")
    p.add_argument("--epochs", action="append", default=[], metavar="NAME=N",
                   help="override a model's epoch cap (training stops at the budget or the cap)")
    p.add_argument("--budget-minutes", type=float, default=10.0,
                   help="training time per model: the cosine schedule spans it and training stops at its end "
                        "(default: %(default)s)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default: %(default)s; on the shared 2-core machine, under load, a "
                        "ResNet-20 training step of 128 images took 4.9 s with 2 threads and 1.0 s with 1: the bundled "
                        "checkpoints were trained as two 1-thread processes side by side)")
    p.add_argument("--write-splits", metavar="DIR", help="also write the train/held-out/calibration .npz files")
    p.add_argument("--seed", type=int, default=SEED, help="weights, data order and augmentation (default: "
                   "%(default)s; another seed gives a fresh held-out model, examples/heldout/README.md)")
    args = p.parse_args(argv)
    try:
        args.epochs = {k: int(v) for k, v in (e.split("=", 1) for e in args.epochs)}
    except ValueError:
        p.error("--epochs expects NAME=N")
    torch.set_num_threads(args.threads)
    if args.write_splits:
        write_splits(args.data, args.write_splits)
    names = list(dict.fromkeys(args.only or MODELS))
    t0 = time.perf_counter()
    xtr, ytr = load_cifar_files(args.data, TRAIN_FILES)
    xte, yte = load_cifar_files(args.data, HELDOUT_FILES)
    print(f"read {len(ytr)} training and {len(yte)} held-out images in {time.perf_counter() - t0:.1f}s", flush=True)
    data = {"train_x": xtr, "train_y": ytr, "heldout_x": xte, "heldout_y": yte}
    results = [run(n, args, data) for n in names]
    print(f"\n{'model':<13} {'params':>9} {'epochs':>6} {'held-out acc':>12} {'train s':>8}  written to")
    for r in results:
        print(f"{r['model']:<13} {r['params']:>9,} {r['epochs']:>6} {100 * r['acc']:>11.2f}% {r['seconds']:>8.0f}  "
              f"{r['dir']}  ({', '.join(f'{k} {v / 1024:.0f} KiB' for k, v in r['sizes'].items())})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
