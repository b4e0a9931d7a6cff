#!/usr/bin/env python
"""ONNX backend benchmark (a script, not a test): onnxruntime vs the torch reference, SNN vs ANN.

    python examples/bench_onnx.py [--batch 256] [--repeats 10] [--threads 1] [--models examples/models]
                                  [--mnist ../shared/data/mnist] [--only-mnist | --only-digits] [--compare-form]
                                  [--json out.json]

For each network it converts (λ = 0.2 for the MNIST example models on MNIST images 0..499,
λ = 0.3 for digits models) and times one forward pass of the same batch, median of --repeats
after one warm-up, on the same number of threads for torch and onnxruntime. The variants are
timed interleaved (one pass of each per round), so a slow phase of a shared machine affects
all of them alike:

* torch SNN   ``runtime.run(graph, x)`` (the reference interpreter); torch ANN: ``spiking=False``
* ORT SNN     the ``export_onnx`` graph in onnxruntime (CPU provider)
* ORT ANN     the same graph exported with ``ann=True`` (every neuron the identity / its ReLU)
* (``--compare-form``) ORT SNN with every neuron in the exporter's fallback form, a comparison
  with every boundary (O(N) per element; the export before the O(1) lookup form)

and checks fidelity on that batch: max |Δlogit| and spike-level agreement against torch. A second
table gives the same timings as throughput (samples/s = batch / median time).
Models: ``examples/models/mnist_cnn.pt2`` and ``mnist_vit.pt2`` when they exist (see
examples/train.py), and three digits models trained here in seconds (MLP, CNN, tiny ViT).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import numpy as np
import onnxruntime
import torch
import torch.nn as nn

from sfn_deploy import convert, load_data, load_model
from sfn_deploy.exporters import onnx as onnx_exporter
from sfn_deploy.exporters.onnx import OnnxRunner, to_onnx
from sfn_deploy.simulators.interpreter import run, run_with_levels

HERE = os.path.dirname(os.path.abspath(__file__))


def _train(model, data, steps, lr):
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(data.x), data.y).backward()
        opt.step()
    return model.eval()


def digits_models():
    import timm
    data = load_data("sklearn:digits")
    test, train = data.split(0.2, seed=0)
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(),
                        nn.Linear(64, 10))
    cnn = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.AvgPool2d(2),
                        nn.Flatten(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=8, patch_size=2,
                            in_chans=1, embed_dim=32, depth=2, num_heads=2)
    out = []
    for name, m, steps, lr in (("digits_mlp", mlp, 150, 1e-2), ("digits_cnn", cnn, 80, 1e-2),
                               ("digits_vit", vit, 80, 3e-3)):
        m = _train(m, train, steps, lr)
        out.append((name, convert(m, train, scale=0.3), test))
    return out


def mnist_models(models_dir, mnist_dir):
    out = []
    for name in ("mnist_cnn", "mnist_vit"):
        path = os.path.join(models_dir, name + ".pt2")
        if not os.path.exists(path) or not mnist_dir:
            continue
        model, identity = load_model(path)
        calib = load_data(f"mnist:{mnist_dir}:0:500")
        snn = convert(model, calib, scale=0.2, source=identity)
        out.append((name, snn, load_data(f"mnist:{mnist_dir}:8000:10000")))
    return out


def timed(fns, repeats):
    """Median seconds per call of each function, timed round-robin after one warm-up call each."""
    for fn in fns.values():
        fn()                                    # warm-up (allocations, kernel selection)
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def compare_form(snn):
    """The SNN export with every site in the fallback form (comparison with every boundary)."""
    saved = onnx_exporter.fire_table
    onnx_exporter.fire_table = lambda *args, **kwargs: None      # no lookup table: the exporter falls back
    try:
        return to_onnx(snn)
    finally:
        onnx_exporter.fire_table = saved


def bench(name, snn, data, batch, repeats, threads, with_compare=False):
    x = data.x[:batch]
    graph = snn.graph
    ref, ref_levels = run_with_levels(graph, x)
    ref = ref.numpy()
    ref_levels = {k: v.numpy() for k, v in ref_levels.items()}
    ort_snn = OnnxRunner(to_onnx(snn), threads=threads)
    ort_lv = OnnxRunner(to_onnx(snn, levels=True), threads=threads)
    ort_ann = OnnxRunner(to_onnx(snn, ann=True), threads=threads)
    logits, levels = ort_lv.run_with_levels(x)
    equal = sum(int((levels[k] == ref_levels[k]).sum()) for k in levels)
    total = sum(levels[k].size for k in levels)
    xn = x.numpy()
    fns = {"torch_snn": lambda: run(graph, x), "torch_ann": lambda: run(graph, x, spiking=False),
           "ort_snn": lambda: ort_snn.run(xn), "ort_ann": lambda: ort_ann.run(xn)}
    if with_compare:
        ort_cmp = OnnxRunner(compare_form(snn), threads=threads)
        assert np.array_equal(ort_cmp.run(xn), ort_snn.run(xn))   # the same network, bit for bit
        fns["ort_snn_compare"] = lambda: ort_cmp.run(xn)
    t = timed(fns, repeats)
    row = {
        "model": name, "sites": len(snn.sites), "batch": int(x.shape[0]),
        **{f"{k}_ms": 1e3 * v for k, v in t.items()},
        **{f"{k}_per_s": x.shape[0] / v for k, v in t.items()},
        "max_abs_dlogit": float(np.abs(logits - ref).max()),
        "logit_scale": float(np.abs(ref).max()),
        "levels_equal_pct": 100.0 * equal / total,
        "sites_all_equal": sum(np.array_equal(levels[k], ref_levels[k]) for k in levels),
        "top1_agree_pct": 100.0 * float((logits.argmax(1) == ref.argmax(1)).mean()),
    }
    row["torch_over_ort_snn"] = row["torch_snn_ms"] / row["ort_snn_ms"]
    row["ort_snn_over_ann"] = row["ort_snn_ms"] / row["ort_ann_ms"]
    row["torch_snn_over_ann"] = row["torch_snn_ms"] / row["torch_ann_ms"]
    return row


THROUGHPUT = [("model", "model"), ("batch", "batch"), ("torch_snn_per_s", "torch SNN samples/s"),
              ("ort_snn_per_s", "ORT SNN samples/s"), ("ort_ann_per_s", "ORT ANN samples/s"),
              ("torch_ann_per_s", "torch ANN samples/s"), ("torch_over_ort_snn", "ORT/torch SNN throughput")]
COLS = [("model", "model"), ("sites", "SFN sites"), ("batch", "batch"), ("torch_snn_ms", "torch SNN ms"),
        ("ort_snn_ms", "ORT SNN ms"), ("torch_over_ort_snn", "torch/ORT (SNN)"), ("ort_ann_ms", "ORT ANN ms"),
        ("ort_snn_over_ann", "ORT SNN/ANN"), ("torch_ann_ms", "torch ANN ms"),
        ("torch_snn_over_ann", "torch SNN/ANN"), ("max_abs_dlogit", "max |Δlogit|"),
        ("logit_scale", "max |logit|"), ("levels_equal_pct", "levels equal %"), ("top1_agree_pct", "top-1 agree %")]


def fmt(v):
    if isinstance(v, float):
        return f"{v:.2e}" if 0 < abs(v) < 1e-2 else f"{v:.2f}"
    return str(v)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1, help="torch and onnxruntime intra-op threads")
    ap.add_argument("--models", default=os.path.join(HERE, "models"))
    ap.add_argument("--mnist", default=os.path.join(HERE, "..", "..", "shared", "data", "mnist"))
    only = ap.add_mutually_exclusive_group()
    only.add_argument("--only-digits", action="store_true")
    only.add_argument("--only-mnist", action="store_true", help="only the MNIST example models (no digits)")
    ap.add_argument("--compare-form", action="store_true",
                    help="also time the SNN export in the fallback form (comparison with every boundary)")
    ap.add_argument("--json", default=None, help="also write the rows here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    nets = [] if args.only_digits else mnist_models(args.models, args.mnist)
    if not args.only_mnist:
        nets += digits_models()
    rows = [bench(name, snn, data, args.batch, args.repeats, args.threads, args.compare_form)
            for name, snn, data in nets]
    cols, thr = list(COLS), list(THROUGHPUT)
    if args.compare_form:
        cols.insert(cols.index(("ort_ann_ms", "ORT ANN ms")), ("ort_snn_compare_ms", "ORT SNN compare-form ms"))
        thr.insert(thr.index(("ort_ann_per_s", "ORT ANN samples/s")),
                   ("ort_snn_compare_per_s", "ORT SNN compare-form samples/s"))
    print(f"# ONNX backend: onnxruntime {onnxruntime.__version__} vs torch {torch.__version__}, "
          f"{args.threads} thread(s), median of {args.repeats}, {platform.processor() or platform.machine()}")
    print("| " + " | ".join(c[1] for c in cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(fmt(r[c[0]]) for c in cols) + " |")
    print()
    print("| " + " | ".join(c[1] for c in thr) + " |")
    print("|" + "---|" * len(thr))
    for r in rows:
        print("| " + " | ".join(f"{r[c[0]]:.0f}" if c[0].endswith("_per_s") else fmt(r[c[0]])
                                for c in thr) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"argv": sys.argv, "threads": args.threads, "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
