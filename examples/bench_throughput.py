"""Throughput of the SNN's counting evaluation against a plain timm evaluation loop of the same ANN, over the
same DataLoader in the same run (issue 17: ≥ 0.8×; docs/benchmarks.md, "Counting evaluation against timm").

Both read the same streamed folder of photos with the model's own preprocessing (timm's data config, 224×224
for ViT-S/16), the same batch size and DataLoader workers; they alternate, ``--rounds`` times each, and the
ratio is of the medians. "SNN" is what ``evaluate`` runs for the SNN: the reference interpreter at T = 1 with
every op counted (``evaluation.measure``); "timm" is ``model(x).argmax(-1)`` under ``torch.inference_mode``.

    python examples/bench_throughput.py                      # ViT-S/16, 256 CIFAR photos, batch 32
    python examples/bench_throughput.py --model timm:resnet18 --photos-per-class 10
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from bench_memory import CIFAR, photos  # noqa: E402

from sfn_deploy import convert  # noqa: E402
from sfn_deploy.data import load_data  # noqa: E402
from sfn_deploy.evaluation import measure  # noqa: E402
from sfn_deploy.models import load_model  # noqa: E402
from sfn_deploy.preprocess import timm_defaults  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="timm:vit_small_patch16_224")
    ap.add_argument("--photos-per-class", type=int, default=26)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--scale", type=float, default=0.2)
    ap.add_argument("--allocator", choices=("cli", "default"), default="cli",
                    help="cli: glibc's mmap threshold as the CLI sets it (sfn_deploy/allocator.py); default: glibc's")
    args = ap.parse_args()
    if args.allocator == "cli":
        from sfn_deploy.allocator import tune
        tune()
    net, ident = load_model(args.model, model_args={"num_classes": 10})
    with tempfile.TemporaryDirectory() as tmp:
        photos(CIFAR, args.photos_per_class * len(os.listdir(CIFAR)), tmp)
        defaults = timm_defaults(net, args.model[len("timm:"):], {})
        data = load_data(tmp, defaults=defaults, workers=args.workers)
        snn = convert(net, data.limit(2 * args.batch_size), scale=args.scale, source=ident,
                      batch_size=args.batch_size)

        def timm_loop() -> None:
            with torch.inference_mode():
                for xb in data.batches(args.batch_size):
                    net(xb).argmax(-1)

        def snn_loop() -> None:
            measure(snn.graph, data, args.batch_size)
        times: dict[str, list[float]] = {"timm": [], "snn": []}
        for _ in range(args.rounds):
            for name, fn in (("timm", timm_loop), ("snn", snn_loop)):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    n = len(data)
    med = {k: statistics.median(v) for k, v in times.items()}
    row = {"model": args.model, "images": n, "batch_size": args.batch_size, "workers": args.workers,
           "threads": torch.get_num_threads(), "allocator": args.allocator, "timm_img_s": round(n / med["timm"], 2),
           "snn_img_s": round(n / med["snn"], 2), "ratio": round(med["timm"] / med["snn"], 3),
           "times": times}
    print(json.dumps(row))


if __name__ == "__main__":
    main()
