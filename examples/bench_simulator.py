#!/usr/bin/env python
"""Cycle-level simulator speed (a script, not a test): counting every op vs a plain PyTorch ANN forward.

    python examples/bench_simulator.py [--samples 2000] [--batch 256] [--repeats 3] [--threads 1,all] [--vit-b 16]
                                       [--json out.json]

For the MNIST example CNN and tiny ViT (examples/models/*.pt2, converted here at λ = 0.2 on
MNIST test images), times on the same batches, interleaved, best of --repeats:
* ANN      the source network as torch.export left it (``ExportedProgram.module()``), plain forward
* counting ``evaluation.measure``: the SNN through the reference interpreter with the OpCounter hook,
           recording every count a report needs (three synaptic-op conventions, MACs, host ops,
           spikes by level, neuron updates)
* interp. ANN  the reference interpreter running the same graph as the ANN (no spikes, no counting):
           what the interpreter itself costs
* counting, torch only  the same counting with the fused C fire loop switched off (``SFN_NATIVE=0``):
           what a machine without a C compiler gets
The fused loop's one-off set-up (compiling it, or loading it from the cache) is timed apart and printed.
Each --threads setting (a comma list; ``all`` = torch's default, one per core) gives both sides the same
number of threads: torch's kernels use them, and so does the fire loop (its parts run on torch's OpenMP pool).
The issue's target: counting runs at least half as fast as the ANN (ratio ANN time / counting time ≥ 0.5).
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

from sfn_deploy import convert, load_data, load_model
from sfn_deploy.evaluation import measure
from sfn_deploy.simulators.interpreter import run

HERE = os.path.dirname(os.path.abspath(__file__))


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _time_model(name: str, ann, snn, test, batch: int, settings: list, repeats: int) -> list[dict]:
    """Best-of-``repeats`` seconds of the ANN forward, the counting simulator, the interpreter running the ANN
    and the counting simulator without the fused loop, interleaved, at each torch thread count in ``settings``."""
    rows = []
    batches = list(test.batches(batch))

    def plain():
        with torch.no_grad():
            for xb in batches:
                ann(xb)

    def counting():
        measure(snn.graph, test, batch)

    def interp_ann():                         # the same interpreter, every neuron the identity
        for xb in batches:
            run(snn.graph, xb, spiking=False)

    def counting_torch():                     # the fused loop off: torch operations only
        old = os.environ.get("SFN_NATIVE")
        os.environ["SFN_NATIVE"] = "0"
        try:
            measure(snn.graph, test, batch)
        finally:
            os.environ.pop("SFN_NATIVE") if old is None else os.environ.__setitem__("SFN_NATIVE", old)

    for threads in settings:
        torch.set_num_threads(threads)
        plain(), counting(), interp_ann(), counting_torch()        # warm-up
        t_ann, t_sim, t_int, t_tor = [], [], [], []
        for _ in range(repeats):             # interleaved, so all see the same machine load
            t_ann.append(_time(plain))
            t_sim.append(_time(counting))
            t_int.append(_time(interp_ann))
            t_tor.append(_time(counting_torch))
        a, s, i, o = min(t_ann), min(t_sim), min(t_int), min(t_tor)
        rows.append({"model": name, "samples": len(test), "batch": batch, "threads": threads,
                     "ann_s": a, "counting_s": s, "interpreter_ann_s": i, "speed_ratio": a / s,
                     "counting_torch_s": o, "speed_ratio_torch": a / o,
                     "runs": {"ann_s": t_ann, "counting_s": t_sim, "interpreter_ann_s": t_int,
                              "counting_torch_s": t_tor}})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--mnist", default=os.environ.get("SFN_MNIST",
                                                      os.path.join(HERE, "..", "..", "shared", "data", "mnist")))
    ap.add_argument("--vit-b", type=int, default=0, metavar="N",
                    help="also time timm vit_base_patch16_224 (random weights) on N random images, batch 8")
    ap.add_argument("--threads", default="1,all",
                    help="torch threads for both sides, a comma list (all: torch's default, one per core)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    every = torch.get_num_threads()
    settings = list(dict.fromkeys(every if t.strip() == "all" else int(t) for t in args.threads.split(",")))
    import sfn_deploy.simulators.firegrid as firegrid
    t0 = time.perf_counter()
    cached = os.path.exists(firegrid.cache_path())
    lib = firegrid.native()
    setup = time.perf_counter() - t0
    print(f"fused fire loop: {'available' if lib is not None else 'unavailable (torch operations)'}, set-up "
          f"{setup:.2f} s ({'loaded from the cache' if cached else 'compiled'})")
    calib = load_data(f"mnist:{args.mnist}:0:1000")
    full_test = load_data(f"mnist:{args.mnist}").limit(args.samples)
    rows = []
    for name in ("mnist_cnn", "mnist_vit") + (("vit_b16",) if args.vit_b else ()):
        if name == "vit_b16":          # random weights and images: speed does not depend on them
            from sfn_deploy.data import Dataset
            torch.manual_seed(0)
            ann, _ = load_model("timm:vit_base_patch16_224")
            x = torch.randn(args.vit_b, 3, 224, 224)
            data = Dataset(x, torch.zeros(args.vit_b, dtype=torch.int64), "random")
            snn = convert(ann, data, scale=0.25, batch_size=8, quiet=True)
            test, batch = data, 8
        else:
            program, _ = load_model(os.path.join(HERE, "models", f"{name}.pt2"))
            ann = program.module()
            snn = convert(program, calib, scale=0.2, quiet=True)
            test, batch = full_test, args.batch
        rows += _time_model(name, ann, snn, test, batch, settings, args.repeats)
    torch.set_num_threads(every)
    print(f"{'model':<10} {'threads':>7} {'samples':>7} {'ANN s':>8} {'counting s':>11} {'ANN/counting':>13} "
          f"{'interp. ANN s':>14} {'torch-only s':>13} {'ANN/torch-only':>15}")
    for r in rows:
        print(f"{r['model']:<10} {r['threads']:>7} {r['samples']:>7} {r['ann_s']:>8.3f} {r['counting_s']:>11.3f} "
              f"{r['speed_ratio']:>13.2f} {r['interpreter_ann_s']:>14.3f} {r['counting_torch_s']:>13.3f} "
              f"{r['speed_ratio_torch']:>15.2f}")
        print(f"{'':<18} per interleaved run, ANN/counting: "
              + " ".join(f"{x / y:.2f}" for x, y in zip(r["runs"]["ann_s"], r["runs"]["counting_s"], strict=True)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
