"""CPU against GPU (issue 17): the SNN's counting evaluation against a plain timm loop of the same ANN on the GPU,
and the spike levels and op counts of one batch on the GPU against the CPU.

The model (random weights unless ``--weights``: throughput and level agreement do not depend on training) is
converted at a fixed λ on the GPU (calibration there too), then, over one streamed folder of photos with the
model's own preprocessing:

- ``gpu_loader``: the timm loop and the SNN evaluation (``evaluation.measure``: every op counted) over the same
  DataLoader, alternating ``--rounds`` times, medians; the same on batches already on the GPU (``gpu_compute``),
  which leaves the loader out;
- ``cpu``: the SNN evaluation of ``--cpu-images`` on the CPU, for the CPU/GPU speed ratio;
- ``levels``: the first batch on both: site levels that differ (the GPU's weight layers sum in another order:
  a site input within an ulp of a boundary can fire differently), top-1 agreement, and whether the counts are
  identical.

One JSON row on stdout (and appended to ``--out`` if given). Needs a CUDA GPU (``--device cpu``: a dry run of
the script itself, every figure then CPU against CPU).

    python examples/bench_device.py --photos PHOTOS --model timm:vit_base_patch16_224
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from sfn_deploy import convert, devices  # noqa: E402
from sfn_deploy.data import load_data  # noqa: E402
from sfn_deploy.evaluation import measure  # noqa: E402
from sfn_deploy.models import load_model  # noqa: E402
from sfn_deploy.preprocess import timm_defaults  # noqa: E402
from sfn_deploy.simulators.interpreter import run_with_levels  # noqa: E402

CIFAR = os.path.join(HERE, "..", "..", "shared", "data", "cifar10", "train")


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(fn) -> float:
    _sync()
    t0 = time.perf_counter()
    fn()
    _sync()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="timm:vit_base_patch16_224")
    ap.add_argument("--weights", default=None)
    ap.add_argument("--photos", default=CIFAR, help="An image folder (class folders or flat).")
    ap.add_argument("--images", type=int, default=1024)
    ap.add_argument("--cpu-images", type=int, default=64)
    ap.add_argument("--calib", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--scale", type=float, default=0.2)
    ap.add_argument("--out", default=None)
    ap.add_argument("--device", default="cuda", help="cpu: a dry run of this script where there is no GPU.")
    args = ap.parse_args()
    net, ident = load_model(args.model, args.weights, model_args={"num_classes": 10})
    defaults = timm_defaults(net, args.model[len("timm:"):], {}) if args.model.startswith("timm:") else None
    data = load_data(args.photos, defaults=defaults, workers=args.workers).limit(args.images)
    gpu = devices.select(args.device)
    t0 = time.perf_counter()
    snn = convert(net, data.limit(args.calib), scale=args.scale, source=ident, batch_size=args.batch_size)
    convert_s = time.perf_counter() - t0
    graph, b = snn.graph, args.batch_size
    net = net.to(gpu)

    def timm_loop(batches) -> None:
        with torch.inference_mode():
            for xb in batches():
                net(xb.to(gpu, non_blocking=True)).argmax(-1).cpu()

    def snn_loop(part) -> None:
        measure(graph, part, b)

    resident = [xb.to(gpu) for xb in data.batches(b)]            # compute only: the batches already there
    on_gpu = type("Resident", (), {"batches": lambda self, size: iter(resident), "__len__": lambda self: len(data)})
    times: dict[str, list[float]] = {k: [] for k in ("timm_loader", "snn_loader", "timm_compute", "snn_compute")}
    for _ in range(args.rounds):
        times["timm_loader"].append(_timed(lambda: timm_loop(lambda: data.batches(b))))
        times["snn_loader"].append(_timed(lambda: snn_loop(data)))
        times["timm_compute"].append(_timed(lambda: timm_loop(lambda: iter(resident))))
        times["snn_compute"].append(_timed(lambda: snn_loop(on_gpu())))
    n = len(data)
    med = {k: statistics.median(v) for k, v in times.items()}

    first = next(iter(data.batches(b)))
    out_gpu, lv_gpu = run_with_levels(graph, first)
    _, counts_gpu = measure(graph, data.limit(first.shape[0]), b)
    devices.select("cpu")
    net = net.cpu()
    out_cpu, lv_cpu = run_with_levels(graph, first)
    _, counts_cpu = measure(graph, data.limit(first.shape[0]), b)
    cpu_part = data.limit(args.cpu_images)
    t0 = time.perf_counter()
    measure(graph, cpu_part, b)
    cpu_s = time.perf_counter() - t0
    differ = sum(int((lv_cpu[k] != lv_gpu[k]).sum()) for k in lv_cpu)
    total = sum(v.numel() for v in lv_cpu.values())
    same_counts = [c.to_dict() for c in counts_cpu.result().layers] == [c.to_dict() for c in counts_gpu.result().layers]
    name = torch.cuda.get_device_name(gpu) if gpu.type == "cuda" else "none (dry run)"
    row = {"model": args.model, "gpu": name, "images": n, "batch_size": b,
           "workers": args.workers, "cpu_threads": torch.get_num_threads(), "convert_gpu_s": round(convert_s, 1),
           "gpu_loader": {"timm_img_s": round(n / med["timm_loader"], 1), "snn_img_s": round(n / med["snn_loader"], 1),
                          "ratio": round(med["timm_loader"] / med["snn_loader"], 3)},
           "gpu_compute": {"timm_img_s": round(n / med["timm_compute"], 1),
                           "snn_img_s": round(n / med["snn_compute"], 1),
                           "ratio": round(med["timm_compute"] / med["snn_compute"], 3)},
           "cpu": {"images": len(cpu_part), "snn_img_s": round(len(cpu_part) / cpu_s, 2),
                   "gpu_over_cpu": round((n / med["snn_loader"]) / (len(cpu_part) / cpu_s), 1)},
           "levels": {"batch": int(first.shape[0]), "elements": total, "differ": differ,
                      "top1_agree": float((out_cpu.argmax(-1) == out_gpu.argmax(-1)).float().mean()),
                      "max_abs_logit_diff": float((out_cpu - out_gpu).abs().max()), "counts_identical": same_counts},
           "times": times}
    print(json.dumps(row))
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
