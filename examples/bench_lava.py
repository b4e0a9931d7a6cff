"""Lava figures of docs/benchmarks.md: streaming throughput against a stock-LIF network, and accuracy.

    python examples/bench_lava.py throughput [--model runs/mnist_cnn.sfn.pt] [--samples 1000] [--rounds 3]
    python examples/bench_lava.py accuracy [--samples 500]

throughput: the converted CNN's Lava bundle streamed one sample per step, in floating and fixed point,
interleaved round by round with the same network built from Lava's own LIF process in place of every
SFN neuron (same synaptic processes, same host pooling; see exporters/lava/build.py). Steps per second
of the run phase (compile and start-up reported apart); the ratio SFN/LIF is per round.

accuracy: torch reference and Lava (float, fixed) on the first N test images (MNIST 8000..), for the
CNN and the tiny ViT converted by examples/demo.sh (runs/*.sfn.pt).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MNIST = os.environ.get("SFN_MNIST", os.path.join(ROOT, "..", "shared", "data", "mnist"))


def _model(path):
    from sfn_deploy.model_file import load
    if not os.path.exists(path):
        sys.exit(f"{path} not found: run examples/demo.sh first (it converts the example models)")
    return load(path)


def throughput(args) -> dict:
    from sfn_deploy.data import load_data
    from sfn_deploy.exporters.lava import export_lava, run_lava
    model = _model(args.model)
    x = load_data(f"mnist:{MNIST}:8000:{8000 + args.samples}").x.numpy()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        bundle = os.path.join(tmp, "b")
        info = export_lava(model, bundle, input_abs_max=model.metrics.get("input_abs_max") or float(np.abs(x).max()))
        for r in range(args.rounds):
            for precision in ("floating_pt", "fixed_pt"):
                got = {}
                order = ("sfn", "lif") if r % 2 == 0 else ("lif", "sfn")
                for neuron in order:
                    t = run_lava(bundle, x, precision, neuron=neuron, timeout=1800)["timings"]
                    got[neuron] = {"steps_per_s": t["steps"] / t["run_s"], "samples_per_s": args.samples / t["run_s"],
                                   "compile_s": t["compile_s"], "wall_s": t["wall_s"]}
                rows.append({"round": r, "precision": precision, **{k: v for k, v in got.items()},
                             "ratio": got["sfn"]["steps_per_s"] / got["lif"]["steps_per_s"]})
                print(f"round {r} {precision}: SFN {got['sfn']['samples_per_s']:.0f} samples/s, "
                      f"LIF {got['lif']['samples_per_s']:.0f} samples/s, ratio {rows[-1]['ratio']:.2f}", flush=True)
    summary = {}
    for precision in ("floating_pt", "fixed_pt"):
        rs = [r for r in rows if r["precision"] == precision]
        summary[precision] = {"sfn_samples_per_s": statistics.median(r["sfn"]["samples_per_s"] for r in rs),
                              "lif_samples_per_s": statistics.median(r["lif"]["samples_per_s"] for r in rs),
                              "ratio_median": statistics.median(r["ratio"] for r in rs),
                              "ratio_min": min(r["ratio"] for r in rs)}
    return {"model": args.model, "samples": args.samples, "processes": info["processes"],
            "latency_steps": info["latency_steps"], "rounds": rows, "summary": summary}


def accuracy(args) -> dict:
    from sfn_deploy.data import load_data
    from sfn_deploy.exporters.lava import export_lava, run_lava
    from sfn_deploy.simulators.interpreter import run_with_levels
    data = load_data(f"mnist:{MNIST}:8000:{8000 + args.samples}")
    y = data.y.numpy()
    out = {}
    for name in ("mnist_cnn", "mnist_vit"):
        model = _model(os.path.join(ROOT, "runs", f"{name}.sfn.pt"))
        ref, levels = run_with_levels(model.graph, data.x)
        ref = ref.numpy()
        row = {"torch": 100.0 * float((ref.argmax(1) == y).mean())}
        with tempfile.TemporaryDirectory() as tmp:
            bundle = os.path.join(tmp, "b")
            export_lava(model, bundle)
            for precision in ("floating_pt", "fixed_pt"):
                r = run_lava(bundle, data.x.numpy(), precision, record=True, timeout=3600)
                pred = r["outputs"].argmax(1)
                same = [float((r["levels"][s] == v.reshape(len(y), -1).numpy()).mean()) for s, v in levels.items()]
                row[precision] = {"accuracy": 100.0 * float((pred == y).mean()),
                                  "prediction_agreement": 100.0 * float((pred == ref.argmax(1)).mean()),
                                  "max_abs_logit_diff": float(np.abs(r["outputs"] - ref).max()),
                                  "levels_equal_min_site": 100.0 * min(same),
                                  "levels_equal_mean": 100.0 * float(np.mean(same)),
                                  "overflows": r["overflows"], "saturations": r["saturations"],
                                  "run_s": r["timings"]["run_s"]}
        out[name] = row
        print(name, json.dumps(row, indent=1), flush=True)
    return {"samples": args.samples, "models": out}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["throughput", "accuracy"])
    ap.add_argument("--model", default=os.path.join(ROOT, "runs", "mnist_cnn.sfn.pt"))
    ap.add_argument("--samples", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=None, help="Write the JSON here (default runs/bench/lava_<what>.json).")
    args = ap.parse_args()
    args.samples = args.samples or (1000 if args.what == "throughput" else 500)
    result = throughput(args) if args.what == "throughput" else accuracy(args)
    out = args.out or os.path.join(ROOT, "runs", "bench", f"lava_{args.what}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
