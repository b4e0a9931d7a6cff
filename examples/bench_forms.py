"""What the interpreter's buffer reuse buys in conversion and in evaluation: ``convert --scale`` (calibration,
bias correction's check, validation) and the counting evaluation of a timm model over streamed photos, with the
in-place and into forms and the buffer pool (``ops.IN_PLACE``, ``ops.INTO``, ``Buffers``: docs/architecture.md)
on, with the pool off (``SFN_BUFFER_POOL_MB=0``, the forms kept), and with everything off, alternating in one
process, ``--rounds`` times each; times are medians, ratios against "on" (issue 17; docs/benchmarks.md, "Counting
evaluation against a timm loop"). Results are the same bits every way (tests/test_interpreter.py); this only times.

    python examples/bench_forms.py                                   # ViT-S/16 at 224, 128 CIFAR photos
    python examples/bench_forms.py --model timm:resnet18 --photos-per-class 13
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

from sfn_deploy import convert, ops  # noqa: E402
from sfn_deploy.allocator import tune  # noqa: E402
from sfn_deploy.data import load_data  # noqa: E402
from sfn_deploy.evaluation import measure  # noqa: E402
from sfn_deploy.models import load_model  # noqa: E402
from sfn_deploy.preprocess import timm_defaults  # noqa: E402

POOL = "SFN_BUFFER_POOL_MB"


def setting(name: str, forms: list[tuple[dict, dict]]) -> None:
    """Put the interpreter in one of the three settings (the form tables are read at each call)."""
    for table, kept in forms:
        table.clear()
        if name != "off":
            table.update(kept)
    if name == "on":
        os.environ.pop(POOL, None)
    else:
        os.environ[POOL] = "0"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="timm:vit_small_patch16_224")
    ap.add_argument("--photos-per-class", type=int, default=13)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--scale", type=float, default=0.2)
    args = ap.parse_args()
    tune()                                          # the CLI's allocator setting
    net, ident = load_model(args.model, model_args={"num_classes": 10})
    forms = [(ops.IN_PLACE, dict(ops.IN_PLACE)), (ops.INTO, dict(ops.INTO))]
    times: dict[str, dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        photos(CIFAR, args.photos_per_class * len(os.listdir(CIFAR)), tmp)
        data = load_data(tmp, defaults=timm_defaults(net, args.model[len("timm:"):], {}), workers=0)
        for _ in range(args.rounds):
            for name in ("on", "pool off", "off"):
                setting(name, forms)
                t0 = time.perf_counter()
                snn = convert(net, data, scale=args.scale, source=ident, batch_size=args.batch_size, validate=True)
                t1 = time.perf_counter()
                measure(snn.graph, data, args.batch_size)
                t2 = time.perf_counter()
                row = times.setdefault(name, {"convert": [], "evaluate": []})
                row["convert"].append(t1 - t0)
                row["evaluate"].append(t2 - t1)
        setting("on", forms)
    med = {k: {p: statistics.median(v) for p, v in r.items()} for k, r in times.items()}
    print(json.dumps({"model": args.model, "images": len(data), "batch_size": args.batch_size,
                      "threads": torch.get_num_threads(), "rounds": args.rounds,
                      "seconds": {k: {p: round(v, 2) for p, v in r.items()} for k, r in med.items()},
                      "time_vs_on": {k: {p: round(v / med["on"][p], 3) for p, v in r.items()} for k, r in med.items()},
                      "times": times}))


if __name__ == "__main__":
    main()
