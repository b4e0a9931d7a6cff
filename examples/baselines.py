"""SFN against the baselines of the literature, on real MNIST (a script, not a test).

    python examples/baselines.py [--only fig3b|table] [--models mnist_cnn mnist_vit] [--out runs/baselines]

fig3b: the main paper's Figure 3b (its Appendix D, "equivalence validation") on the example CNN:
       test accuracy against T for rate-coded IF neurons over T steps and for the single-step
       multi-threshold neuron with N = T levels (Theorem 1), with the classic v(0) = 0 and with
       v(0) = θ/2; writes figures/fig3b_if_vs_mtn.png and fig3b.{md,json}.
table: one comparison table per model: method, T, ANN and SNN accuracy, energy ratio under the
       paper's convention (a level-y spike is |y| additions) and the event convention (one op per
       non-zero spike), conversion time; writes table.{md,json}.

MNIST: calibrate (and, for SFN, search λ) on images 0..7999, test on 8000..9999, as
examples/benchmark.py. Every figure in docs/benchmarks.md "Baselines" comes from this script.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import time
from pathlib import Path

import torch
from benchmark import (  # the same Markdown tables and files as the other benchmarks (this folder is on sys.path)
    save_part,
    table,
)

from sfn_deploy import convert, load_data, load_model
from sfn_deploy.capture import capture
from sfn_deploy.config import load_config
from sfn_deploy.convert import build_graph
from sfn_deploy.errors import UserError
from sfn_deploy.evaluation import accuracy, energy_constants, measure
from sfn_deploy.methods import apply_method, method_of

HERE = os.path.dirname(os.path.abspath(__file__))
MODELS = os.path.join(HERE, "models")


def score(graph, test, batch_size=250) -> dict:
    """SNN accuracy and energy ratios (paper and event conventions) on the test set."""
    e_ac, e_mac = energy_constants("cmos45")
    t0 = time.time()
    pred, counter = measure(graph, test, batch_size)
    counts = counter.result()
    return {"SNN acc %": accuracy(pred, test.y), "energy (paper)": counts.energy_ratio(e_ac, e_mac, "spike"),
            "energy (event)": counts.energy_ratio(e_ac, e_mac, "event"), "sim s": round(time.time() - t0, 1)}


def fig3b(train, test, out, ts, half_max=None):
    model, _ = load_model(os.path.join(MODELS, "mnist_cnn.pt2"))
    t0 = time.time()
    base = build_graph(model, train, load_config("", {"method": "if"}), quiet=True)   # p = 0.1 (99.9th pct)
    calib_s = time.time() - t0
    ann, _ = measure(base, test, spiking=False)
    ann_acc = accuracy(ann, test.y)
    rows = []
    partial = os.path.join(out, "fig3b.partial.json")        # rows of an interrupted run are reused
    done = {}
    if os.path.exists(partial):
        done = {(r["method"], r["v(0)"], r["T"]): r for r in json.loads(Path(partial).read_text())}
    for v0 in (0.0, 0.5):
        for T in ts:
            if v0 and half_max and half_max < T:
                continue
            for method in ("if", "mtn"):
                key = (method, "θ/2" if v0 else "0", T)
                if key in done and done[key].get("samples", len(test)) == len(test):
                    rows.append(done[key])
                    continue
                g = apply_method(copy.deepcopy(base), method, T, 0.1, v0=v0)
                r = {"method": method, "v(0)": key[1], "T": T, "ANN acc %": ann_acc, **score(g, test)}
                rows.append(r)
                print(r, flush=True)
                with open(partial, "w") as f:
                    json.dump(rows, f, indent=1)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    style = {("if", 0.0): ("o-", "C0", "IF, T steps, v(0) = 0"), ("mtn", 0.0): ("s-", "C3", "MTN, 1 step, N = T"),
             ("if", 0.5): ("o--", "C2", "IF, v(0) = θ/2"), ("mtn", 0.5): ("s--", "C1", "MTN, v_M(0) = θ_M/2")}
    for (method, v0), (fmt, color, label) in style.items():
        sel = [r for r in rows if r["method"] == method and r["v(0)"] == ("θ/2" if v0 else "0")]
        xs = [r["T"] for r in sel]
        axes[0].plot(xs, [r["SNN acc %"] for r in sel], fmt, color=color, label=label, ms=4)
        axes[1].plot(xs, [r["energy (paper)"] for r in sel], fmt, color=color, label=label, ms=4)
    axes[0].axhline(ann_acc, color="k", ls=":", label=f"ANN {ann_acc:.2f} %")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("T (IF timesteps; MTN levels N = T)")
    axes[0].set_ylabel("test accuracy (%)")
    axes[0].set_ylim(0, 100)
    axes[1].set_ylabel("energy ratio (paper convention)")
    axes[1].set_yscale("log")
    axes[0].legend(fontsize=7, loc="lower right")
    fig.suptitle("Figure 3b on the MNIST CNN (2,000 test images): IF over T steps vs. one-step MTN", fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.join(out, "figures"), exist_ok=True)
    fig.savefig(os.path.join(out, "figures", "fig3b_if_vs_mtn.png"), dpi=120)
    md = (f"ANN accuracy {ann_acc:.2f} %; calibration (8,000 images, shared by all rows) {calib_s:.1f} s\n\n"
          + table(rows, ["method", "v(0)", "T", "SNN acc %", "energy (paper)", "energy (event)", "sim s"]))
    return rows, md


def comparison(train, test, names, settings):
    rows = []
    for name in names:
        model, ident = load_model(os.path.join(MODELS, f"{name}.pt2"))
        ann, _ = measure(capture(model, test.x[:2]), test, spiking=False)      # the source ANN, as captured
        ann_acc = accuracy(ann, test.y)
        for method, T in settings:
            kw = {} if method == "sfn" else {"method": method, "timesteps": T}
            if method == "pmsm":
                kw["epochs"] = PMSM_EPOCHS
            t0 = time.time()
            try:
                snn = convert(model, train, source=ident, **kw)
            except UserError as e:      # e.g. mbe on the CNN (no GELU/softmax/LayerNorm to approximate)
                print(f"{name} {method}: skipped: {e}", flush=True)
                continue
            secs = time.time() - t0
            m, steps = method_of(snn.graph)
            lam = sorted({round(s.attrs["lam"], 3) for s in snn.sites if s.attrs.get("role") != "post-softmax"})
            note = " (λ searched)" if m == "sfn" else " (T internal)" if m == "mbe" else ""
            r = {"model": name, "method": m + note,
                 "T": steps,
                 "steps run": snn.graph.timesteps, "ANN acc %": ann_acc, **score(snn.graph, test),
                 "convert s": round(secs, 1), "λ": lam[0] if m == "sfn" and len(lam) == 1 else None}
            rows.append(r)
            print(r, flush=True)
    md = table(rows, ["model", "method", "T", "steps run", "ANN acc %", "SNN acc %", "energy (paper)",
                         "energy (event)", "convert s", "sim s", "λ"])
    return rows, md


TABLE = [("sfn", 1), ("mtn", 16), ("if", 16), ("mtn", 64), ("if", 64), ("ecmt", 1), ("ecmt", 2), ("ecmt", 4),
         ("ecmt", 8), ("pmsm", 1), ("mbe", 8), ("mbe", 16)]
PMSM_EPOCHS = 2


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", action="append", choices=["fig3b", "table"])
    ap.add_argument("--mnist", default=os.path.join(HERE, "..", "..", "shared", "data", "mnist"))
    ap.add_argument("--models", nargs="+", default=["mnist_cnn", "mnist_vit"])
    ap.add_argument("--timesteps", nargs="+", type=int, default=[1, 2, 4, 8, 16, 32, 64, 128, 256],
                    help="fig3b: the T values")
    ap.add_argument("--test", type=int, default=2000, help="test images (from 8000)")
    ap.add_argument("--methods", nargs="+", help="table: only these methods")
    ap.add_argument("--half-max", type=int, default=None, help="fig3b: largest T of the v(0) = θ/2 series")
    ap.add_argument("--threads", type=int, default=max(1, os.cpu_count() or 1))
    ap.add_argument("--out", default=os.path.join(HERE, "..", "runs", "baselines"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    train = load_data(f"mnist:{args.mnist}:0:8000")
    test = load_data(f"mnist:{args.mnist}:8000:{8000 + args.test}")
    for part in args.only or ["fig3b", "table"]:
        t0 = time.time()
        if part == "fig3b":
            rows, md = fig3b(train, test, args.out, args.timesteps, args.half_max)
        else:
            rows, md = comparison(train, test, args.models,
                                  [r for r in TABLE if not args.methods or r[0] in args.methods])
        tag = part if part == "fig3b" or args.models == ["mnist_cnn", "mnist_vit"] \
            else f"{part}-{'-'.join(args.models)}"
        tag += f"-{'-'.join(args.methods)}" if part == "table" and args.methods else ""
        print(f"\n## {part} ({time.time() - t0:.0f} s)\n\n{md}\n", flush=True)
        save_part(args.out, tag, rows, md)


if __name__ == "__main__":
    main()
