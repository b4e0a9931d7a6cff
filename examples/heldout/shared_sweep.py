#!/usr/bin/env python
"""The best shared λ on the test split, for issue 16's energy figure: "at the budget point, the energy ratio at
least 20 % below the best shared-λ point of equal or better test accuracy" (docs/benchmarks.md, "Search on
held-out models").

For each held-out row of ``default_rows.sh`` (same model, calibration data and test split): calibrate once with
convert's passes (λ = 1), then the paper's shared λ without bias correction at 17 values 0.05 … 0.8 (ratio
2^(1/4)), each run on the whole test split (accuracy, energy ratio). Then, for every default-convert row given
with ``--rows`` (its test accuracy and energy from ``evaluate``), the cheapest shared λ at least as accurate on
the test split, refined at ratio 2^(1/16) above it (3 more λ, the grid's step split in four), and the saving
``1 − energy(row) / energy(that λ)``. One JSON line per model (``sweep``, ``points`` with the comparisons).

    python examples/heldout/shared_sweep.py --rows examples/heldout/default_convert_budget_search_check_results.jsonl \\
        --rows examples/heldout/default_convert_budget05_results.jsonl > sweeps.jsonl
    python examples/heldout/shared_sweep.py --summary sweeps.jsonl
    python examples/heldout/shared_sweep.py --rows other_rows.jsonl --reuse sweeps.jsonl > other.jsonl
    python examples/heldout/shared_sweep.py --rows other_rows.jsonl --input-encoding auto > same_input.jsonl

The shared-λ points keep the input analog (the paper's) unless ``--input-encoding`` says otherwise.

Needs the data of default_rows.sh (/tmp/heldout, /tmp/heldout2, /tmp/heldout3, /tmp/cifar_splits).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

GRID = [round(0.05 * 2 ** (k / 4), 5) for k in range(17)]       # 0.05 … 0.8
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def rows_of_default_rows(mnist: str) -> dict[str, tuple[str, str, str]]:
    """name → (model, calibration, test) of examples/heldout/models.txt, as default_rows.sh runs them."""
    out = {}
    with open(os.path.join(ROOT, "examples/heldout/models.txt")) as f:
        for line in f:
            if line.strip() and not line.startswith("#"):
                name, model, cal, test = line.split()[:4]
                model = model if os.path.isabs(model) else os.path.join(ROOT, model)
                if os.path.isfile(model):
                    out[name] = (model, cal.format(mnist=mnist), test.format(mnist=mnist))
    return out


def shared_graph(model_path: str, calibration: str, input_encoding: str = "analog"):
    """The model calibrated with convert's passes at λ = 1 (no bias correction): set_scale gives a shared λ."""
    from sfn_deploy.config import load_config
    from sfn_deploy.convert import build_graph
    from sfn_deploy.data import load_data
    from sfn_deploy.models import load_model

    return build_graph(load_model(model_path)[0], load_data(calibration),
                       load_config("", {"scale": 1.0, "input_encoding": input_encoding}), quiet=True)


def sweep(model_path: str, calibration: str, test_spec: str, targets: list[dict],
          known: list[dict] | None = None, input_encoding: str = "analog") -> dict:
    import torch

    from sfn_deploy.data import load_data
    from sfn_deploy.evaluation import accuracy, energy_constants, measure
    from sfn_deploy.passes import set_scale

    test = load_data(test_spec)
    graph = shared_graph(model_path, calibration, input_encoding)
    ann_pred, _ = measure(graph, test, spiking=False)
    e = energy_constants()
    points: dict[float, tuple[float, float]] = {}

    def run(lam: float) -> tuple[float, float]:
        if lam not in points:
            set_scale(graph, lam)
            with torch.no_grad():
                pred, counter = measure(graph, test)
            points[lam] = (accuracy(pred, test.y), counter.result().energy_ratio(*e))
        return points[lam]
    if known:       # an earlier run of the same calibration: check one of its points, then take them all
        check = known[len(known) // 2]
        acc, energy = run(check["lam"])
        if round(acc, 2) == check["acc"] and round(energy, 4) == check["energy"]:
            points.update({p["lam"]: (p["acc"], p["energy"]) for p in known if p["lam"] != check["lam"]})
        else:
            print(f"--reuse: λ {check['lam']} gives {acc:.2f} % / {energy:.4f} here, {check['acc']} % / "
                  f"{check['energy']} there: running every λ", file=sys.stderr)
    for lam in GRID:
        run(lam)
    compared = []
    for t in targets:
        ok = [lam for lam, (acc, _) in points.items() if acc >= t["test_snn"] - 1e-9]
        if ok:
            best = min(ok, key=lambda v: points[v][1])
            for k in (1, 2, 3):                     # refine above it (larger λ is usually cheaper)
                run(round(best * 2 ** (k / 16), 6))
            ok = [lam for lam, (acc, _) in points.items() if acc >= t["test_snn"] - 1e-9]
            best = min(ok, key=lambda v: points[v][1])
            b_acc, b_energy = points[best]
            compared.append({**t, "best_shared_lam": best, "best_shared_acc": round(b_acc, 2),
                             "best_shared_energy": round(b_energy, 4),
                             "saving": round(1 - t["energy"] / b_energy, 4)})
        else:
            compared.append({**t, "best_shared_lam": None, "saving": None})
    return {"ann_test": round(accuracy(ann_pred, test.y), 2),
            "sweep": [{"lam": lam, "acc": round(a, 2), "energy": round(en, 4)}
                      for lam, (a, en) in sorted(points.items())],
            "points": compared}


def summary(path: str) -> None:
    print("| model | row | test drop | energy | best shared λ (test acc ≥) | its energy | saving |")
    print("|---|---|---|---|---|---|---|")
    with open(path) as f:
        rows = [json.loads(line) for line in f]
    for r in rows:
        for p in r["points"]:
            best = ("none as accurate" if p["best_shared_lam"] is None
                    else f"{p['best_shared_lam']:g} ({p['best_shared_acc']:.2f} %)")
            e = "" if p["best_shared_lam"] is None else f"{p['best_shared_energy']:.4f}"
            s = "" if p["saving"] is None else f"{100 * p['saving']:.1f} %"
            print(f"| {r['model']} | {p['tag']} | {p['test_drop']:.2f} | {p['energy']:.4f} | {best} | {e} | {s} |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("models", nargs="*", help="row names of default_rows.sh (default: every row in --rows)")
    ap.add_argument("--rows", action="append", default=[], help="default_rows.sh results to compare (repeatable)")
    ap.add_argument("--mnist", default=os.path.join(ROOT, "..", "shared", "data", "mnist"))
    ap.add_argument("--reuse", metavar="JSONL", help="an earlier run's results: take their sweeps (one point of "
                    "each is run again and must agree), run only the refinements the new rows need")
    ap.add_argument("--input-encoding", choices=("analog", "spikes", "auto"), default="analog",
                    help="of the shared-λ points (default analog: the paper's; docs/concepts.md 'Input encoding')")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--summary", metavar="JSONL", help="print the table of a results file and stop")
    args = ap.parse_args()
    if args.summary:
        summary(args.summary)
        return 0
    import torch
    torch.set_num_threads(args.threads)
    targets: dict[str, list[dict]] = {}
    for path in args.rows:
        with open(path) as f:
            rows = [json.loads(line) for line in f]
        for r in rows:
            targets.setdefault(r["model"], []).append({k: r[k] for k in ("tag", "test_snn", "test_drop", "energy")})
    earlier: dict[str, list[dict]] = {}
    if args.reuse:
        with open(args.reuse) as f:
            earlier = {r["model"]: r["sweep"] for r in map(json.loads, f)}
    known = rows_of_default_rows(args.mnist)
    for name in args.models or [n for n in known if n in targets]:
        if name not in known:
            print(f"unknown row {name!r} (known: {', '.join(known)})", file=sys.stderr)
            return 2
        print(json.dumps({"model": name, "input_encoding": args.input_encoding,
                          **sweep(*known[name], targets.get(name, []), earlier.get(name), args.input_encoding)}),
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
