"""Fidelity and cost benchmarks of the conversion (a script, not a test).

    python examples/benchmark.py [--only fidelity|sweep|ablation|scale|hardware] [--mnist DIR] [--out runs/bench]

Prints Markdown tables (recorded in docs/benchmarks.md) and writes them with the raw
numbers to --out. MNIST: calibrate/search on images 0..7999, test on 8000..9999.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import Counter

import torch

from sfn_deploy import convert, evaluate, load_data, load_model
from sfn_deploy.config import load_config
from sfn_deploy.convert import build_graph
from sfn_deploy.passes import set_scale

HERE = os.path.dirname(os.path.abspath(__file__))
MODELS = os.path.join(HERE, "models")


def table(rows: list[dict], cols: list[str]) -> str:
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        out.append("| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |")
    return "\n".join(out)


def save_part(out: str, tag: str, rows, md: str) -> None:
    """One benchmark part's rows (JSON) and its Markdown table, as OUT/TAG.json and OUT/TAG.md."""
    with open(os.path.join(out, f"{tag}.json"), "w") as f:
        json.dump(rows, f, indent=1, default=str)
    with open(os.path.join(out, f"{tag}.md"), "w") as f:
        f.write(md + "\n")


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 1 else f"{v:.2f}"
    return "" if v is None else str(v)


def fidelity(train, test, names, methods=None):
    rows = []
    settings = {
        "paper (shared λ, max accuracy, 50 trials, 2 % val)": dict(search="shared", trials=50, val_fraction=0.02),
        "shared λ, lowest energy within budget (60 trials, 25 % val)": dict(search="shared", trials=60,
                                                                           val_fraction=0.25, budget=True),
        "per-block λ, lowest energy within budget (60 trials, 25 % val)": dict(search="per-block", trials=60,
                                                                              val_fraction=0.25, budget=True),
        "per-block λ, nearest-level rounding, within budget (60 trials, 25 % val)": dict(
            search="per-block", trials=60, val_fraction=0.25, budget=True, rounding="nearest"),
    }
    if methods:
        settings = {k: v for k, v in settings.items() if any(m in k for m in methods)}
    for name in names:
        model, ident = load_model(os.path.join(MODELS, f"{name}.pt2"))
        budget = 0.3 if "cnn" in name else 0.5
        for label, s in settings.items():
            s = dict(s)
            use_budget = s.pop("budget", False)
            t0 = time.time()
            snn = convert(model, train, source=ident, max_drop=budget if use_budget else None, **s)
            secs = time.time() - t0
            r = evaluate(snn, test)
            lams = sorted({round(x.attrs["lam"], 3) for x in snn.sites if x.attrs["kind"] != "softmax"})
            rows.append({"model": name, "method": label, "ANN acc %": r["ann_accuracy"], "SNN acc %": r["accuracy"],
                         "drop (pt)": round(r["ann_accuracy"] - r["accuracy"], 2), "energy ratio": r["energy_ratio"],
                         "λ": lams[0] if len(lams) == 1 else f"{lams[0]}..{lams[-1]}", "convert s": round(secs, 1)})
            print(rows[-1], flush=True)
    return rows, table(rows, ["model", "method", "ANN acc %", "SNN acc %", "drop (pt)", "energy ratio", "λ",
                              "convert s"])


def sweep(train, test, out):
    model, _ = load_model(os.path.join(MODELS, "mnist_vit.pt2"))
    graph = build_graph(model, train, load_config("", {"scale": 1.0}), quiet=True)
    from sfn_deploy.evaluation import accuracy, measure
    ann, _ = measure(graph, test, spiking=False)
    rows = []
    for lam in [0.05, 0.08, 0.1, 0.12, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.7, 1.0]:
        set_scale(graph, lam)
        pred, counter = measure(graph, test)
        rows.append({"λ": lam, "SNN acc %": accuracy(pred, test.y), "energy ratio": counter.result().energy_ratio()})
        print(rows[-1], flush=True)
    ann_acc = accuracy(ann, test.y)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.6))
    xs = [r["λ"] for r in rows]
    ax.plot(xs, [r["SNN acc %"] for r in rows], "o-", color="C0", label="SNN accuracy")
    ax.axhline(ann_acc, color="C0", ls=":", label=f"ANN {ann_acc:.2f} %")
    ax.set_xlabel("scale factor λ")
    ax.set_ylabel("test accuracy (%)", color="C0")
    ax.set_xscale("log")
    ax2 = ax.twinx()
    ax2.plot(xs, [r["energy ratio"] for r in rows], "s--", color="C3", label="energy ratio")
    ax2.set_ylabel("energy ratio", color="C3")
    ax.set_title("Tiny ViT on MNIST (2,000 test images), T = 1")
    fig.legend(loc="lower center", ncol=3, fontsize=8)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    os.makedirs(os.path.join(out, "figures"), exist_ok=True)
    fig.savefig(os.path.join(out, "figures", "vit_lambda_sweep.png"), dpi=120)
    return rows, f"ANN accuracy {ann_acc:.2f} %\n\n" + table(rows, ["λ", "SNN acc %", "energy ratio"])


def ablation(train, test):
    model, ident = load_model(os.path.join(MODELS, "mnist_vit.pt2"))
    rows = []
    for fire in ("linear", "exponential", "sformer"):
        for scaling in (False, True):
            kw = {"scale": 1.0} if not scaling else {"search": "shared", "trials": 20, "val_fraction": 0.1}
            snn = convert(model, train, source=ident, fire=fire, **kw)
            r = evaluate(snn, test)
            lam = snn.sites[0].attrs["lam"]
            rows.append({"scaling": "λ searched" if scaling else "none (λ = 1)", "fire function": fire,
                         "λ": round(lam, 3), "SNN acc %": r["accuracy"], "ANN acc %": r["ann_accuracy"],
                         "energy ratio": r["energy_ratio"]})
            print(rows[-1], flush=True)
    return rows, table(rows, ["scaling", "fire function", "λ", "SNN acc %", "ANN acc %", "energy ratio"])


SCALE_CHILD = r"""
import json, resource, sys, time, numpy as np, torch
from sfn_deploy import convert, load_model
from sfn_deploy.data import Dataset
torch.manual_seed(0)
t0 = time.time()
model, ident = load_model("timm:vit_base_patch16_224", model_args={"num_classes": 1000})
x = torch.randn(64, 3, 224, 224)
data = Dataset(x, torch.zeros(64, dtype=torch.int64), "random-64")
snn = convert(model, data, scale=0.25, batch_size=16, source=ident)
wall = time.time() - t0
if len(sys.argv) > 1:       # keep the converted model and 4 of the images for the hardware report
    from sfn_deploy.model_file import save
    save(snn, sys.argv[1] + "/vit_b16.sfn.pt")
    np.savez(sys.argv[1] + "/vit_b16_random4.npz", x=x[:4].numpy(), y=np.zeros(4, dtype=np.int64))
print(json.dumps({"wall_s": round(wall, 1), "sites": len(snn.sites), "nodes": len(snn.graph.nodes),
                  "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}))
"""


def scale(out):
    r = subprocess.run([sys.executable, "-c", SCALE_CHILD, out], capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(r.stderr[-3000:])
    row = json.loads(r.stdout.strip().splitlines()[-1])
    row["model"] = "timm vit_base_patch16_224 (random weights), 64 random 224×224 images, λ = 0.25"
    print(row, flush=True)
    return [row], table([row], ["model", "sites", "nodes", "wall_s", "peak_rss_gb"])


CLI = [sys.executable, "-m", "sfn_deploy.cli"]


def hardware(out):
    """Pre-flight check and report of the ViT-B/16 kept by the scale part, on every main target."""
    model = os.path.join(out, "vit_b16.sfn.pt")
    if not os.path.exists(model):
        scale(out)
    rows = []
    for target in ("loihi2", "loihi1"):
        r = subprocess.run([*CLI, "check", model, "--target", target, "--json"], capture_output=True, text=True)
        d = json.loads(r.stdout)
        rows.append({"check": target, "exit": r.returncode, "cores": d["cores"], "chips": d["chips"],
                     "chips bound by": d["chip_binding"], "violations": len(d["violations"]),
                     "layers bound by": ", ".join(f"{k} ({v})" for k, v in
                                                  Counter(x["binding"] for x in d["layers"]).most_common())})
    r = subprocess.run([*CLI, "report", model, "--data", os.path.join(out, "vit_b16_random4.npz"),
                        "--target", "loihi2", "--target", "loihi1", "--target", "cmos45",
                        "-o", os.path.join(out, "vit_b16.report.md"), "--json"], capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(r.stderr[-3000:])
    rep = json.loads(r.stdout)
    for name, t in rep["targets"].items():
        e = t["estimate"]
        rows.append({"check": f"report {name}", "cores": e["cores"], "chips": e["chips"],
                     "energy_j": e["energy_j"], "latency_s": e["latency_s"], "snn/int8": e["snn_over_int8_ann"],
                     "energy ratio": rep["energy_ratio"]})
    print(rows, flush=True)
    return rows, table(rows, ["check", "exit", "cores", "chips", "chips bound by", "violations", "layers bound by",
                              "energy_j", "latency_s", "snn/int8", "energy ratio"])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", action="append", choices=["fidelity", "sweep", "ablation", "scale", "hardware"])
    ap.add_argument("--mnist", default=os.path.join(HERE, "..", "..", "shared", "data", "mnist"))
    ap.add_argument("--models", nargs="+", default=["mnist_cnn", "mnist_vit"])
    ap.add_argument("--methods", nargs="+", help="fidelity: only methods whose label contains one of these")
    ap.add_argument("--out", default=os.path.join(HERE, "..", "runs", "bench"))
    args = ap.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    os.makedirs(args.out, exist_ok=True)
    parts = args.only or ["fidelity", "sweep", "ablation", "scale"]
    train = test = None
    if set(parts) - {"scale", "hardware"}:
        train = load_data(f"mnist:{args.mnist}:0:8000")
        test = load_data(f"mnist:{args.mnist}:8000:10000")
    for part in parts:
        t0 = time.time()
        if part == "fidelity":
            rows, md = fidelity(train, test, args.models, args.methods)
        elif part == "sweep":
            rows, md = sweep(train, test, args.out)
        elif part == "ablation":
            rows, md = ablation(train, test)
        elif part == "scale":
            rows, md = scale(args.out)
        else:
            rows, md = hardware(args.out)
        print(f"\n## {part} ({time.time() - t0:.0f} s)\n\n{md}\n", flush=True)
        tag = part + ("-" + "-".join(args.methods).replace(" ", "_") if part == "fidelity" and args.methods else "")
        save_part(args.out, tag, rows, md)


if __name__ == "__main__":
    main()
