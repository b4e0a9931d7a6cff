#!/usr/bin/env python
"""Training-free knobs of issue 16, measured on a model before any is built into the search
(docs/concepts.md "Knobs measured and not kept"; rows in examples/heldout/knobs_results.jsonl).

Each mode calibrates once (``convert``'s passes at λ = 1, a seeded random 2,000 images of ``--data``), then sweeps
λ and prints one JSON row per point: top-1 agreement with the ANN, accuracy and energy ratio on a seeded random
2,000 images of ``--test``, against the shared λ at the same calibration.

- ``levels``: one global M (``--levels``, default 4, 6, 8, 10) and rounding (``--rounding``, paper, nearest) at
  every λ (post-softmax levels dense); or the given ``--pairs M:λ,…`` (``--fire`` for each).
- ``per-channel``: θ per channel (the same top-1 % rule over each channel's positive / negative values, 500
  calibration images) instead of per site, applied as a prescale x·θ/θ_c before the site's fire rule and
  out·θ_c/θ after it: the same levels and the same counting (the repeated-value caps are not applied per channel).
- ``percentile``: one global p (θ = the top-p % activation of each site, from the calibration histograms kept on
  the sites: no recalibration) for p in 0.01, 0.1, 0.3, 1 (the default), 3, at every λ.
- ``sensitivity``: λ_s = c·d_s with d_s = (b_s / a_s)^(1/3) (geometric mean 1), where a_s is the mean squared
  error of the logits with only site s quantised at ``--lam0`` (÷ λ0², 256 calibration images) and b_s the
  energy of the operations its spikes drive at λ0 (× λ0): minimises Σ a_s λ_s² (quantisation noise ∝ step²) at
  fixed Σ b_s / λ_s (operations ∝ 1/step); c takes the λ values.
- ``refit``: at each λ, each weight layer refit to what the SNN actually feeds it, in graph order on 256
  calibration images with the layers before it refit (as bias correction measures its shifts): ``bias`` (the
  shipped bias correction: the mean shift), ``affine`` (per output channel SNN ≈ a·ANN + b by least squares, undone
  by W/a and (bias − b)/a; a clamped to [0.8, 1.25]) and ``lsq`` (the layer's weights and bias solved by ridge
  least squares so that, fed the SNN's inputs, it gives the ANN's outputs; per convolution group, ridge 10⁻³ of the
  mean feature power).

    python examples/heldout/knobs.py sensitivity examples/models/mnist_vit.pt2 \\
        --data mnist:/work/shared/data/mnist:0:8000 --test mnist:/work/shared/data/mnist:8000:10000 \\
        --lam 0.07,0.1,0.15,0.2,0.25,0.3,0.4 --lam0 0.15
"""
from __future__ import annotations

import argparse
import json
import math

import torch

from sfn_deploy.config import load_config
from sfn_deploy.convert import build_graph
from sfn_deploy.data import load_data
from sfn_deploy.evaluation import accuracy, energy_constants, measure, paired_drop
from sfn_deploy.models import load_model
from sfn_deploy.passes import set_levels, set_scale
from sfn_deploy.simulators import interpreter as interp


def _row(args, graph, test, ann_pred, point, **tags) -> None:
    set_scale(graph, point)
    pred, counter = measure(graph, test)
    e = energy_constants()
    drop = paired_drop(ann_pred == test.y, pred == test.y)
    print(json.dumps({"model": args.model, **tags,
                      "agree": round(100 * float((pred == ann_pred).float().mean()), 2),
                      "acc": round(accuracy(pred, test.y), 2), "ann": round(accuracy(ann_pred, test.y), 2),
                      "drop": [round(v, 2) for v in (drop.points, drop.low, drop.high)],
                      "energy": round(counter.result().energy_ratio(*e), 4)}), flush=True)


def levels(args, graph, calib, test, ann_pred) -> None:
    if args.pairs:
        for m, lam in args.pairs:
            set_levels(graph, m, "dense", args.fire)
            _row(args, graph, test, ann_pred, lam, M=m, fire=args.fire, lam=lam)
        return
    for m in args.levels:
        for rounding in args.rounding:
            for s in graph.sites:
                s.attrs["rounding"] = rounding
            set_levels(graph, m, "dense", args.fire)
            for lam in args.lams:
                _row(args, graph, test, ann_pred, lam, M=m, rounding=rounding, lam=lam)


def percentile(args, graph, calib, test, ann_pred) -> None:
    from sfn_deploy.calibrate import site_histogram, top_percent
    for p in (0.01, 0.1, 0.3, 1.0, 3.0):
        for s in graph.sites:
            a = s.attrs
            if a["kind"] == "softmax":
                continue
            a["percentile"] = p
            a["theta_pos"] = top_percent(site_histogram(s, 0), p)
            a["theta_neg"] = 0.0 if a.get("absorbs") else top_percent(site_histogram(s, 1), p)
        for lam in args.lams:
            _row(args, graph, test, ann_pred, lam, p=p, lam=lam)


def _top1(v: torch.Tensor) -> torch.Tensor:
    """The 99th percentile of the positive values of each column (0 where a column has none), on at most
    200,000 random values per column."""
    out = []
    for c in range(v.shape[1]):
        col = v[:, c]
        col = col[col > 0]
        out.append(torch.quantile(col[torch.randperm(len(col))[:200000]].float(), 0.99) if len(col)
                   else torch.tensor(0.0))
    return torch.stack(out)


def per_channel(args, graph, calib, test, ann_pred) -> None:
    sites = {s.name: s for s in graph.sites if s.attrs["kind"] == "dual"}
    axis = {n: (1 if graph[s.attrs["feeds"]].op == "conv2d" else -1) for n, s in sites.items()}
    seen: dict[str, list] = {n: [] for n in sites}

    def hook(node, a, out, extra):
        if node.name in sites:
            x = a[0].detach().movedim(axis[node.name], -1)
            seen[node.name].append(x.reshape(-1, x.shape[-1]))
    interp.run(graph, calib.head(500), spiking=False, hook=hook)
    ratio = {}
    for n in sites:
        v = torch.cat(seen.pop(n))
        channel = (_top1(v), _top1(-v))
        site = [torch.quantile(p[torch.randperm(len(p))[:500000]], 0.99) if len(p) else torch.tensor(0.0)
                for p in (v[v > 0], -v[v < 0])]
        ratio[n] = tuple(torch.where(c > 0, s / c.clamp_min(1e-12), torch.ones_like(c))
                         for s, c in zip(site, channel, strict=True))
    plain = interp.SnnInterpreter.fire
    on = {"per_channel": False}

    def fire(self, node, a, event):
        if not on["per_channel"] or node.name not in ratio:
            return plain(self, node, a, event)
        x = a[0]
        shape = [1] * x.dim()
        shape[axis[node.name]] = -1
        rp, rn = (r.view(shape) for r in ratio[node.name])
        out = plain(self, node, [torch.where(x >= 0, x * rp, x * rn)], event)
        return torch.where(out >= 0, out / rp, out / rn)
    interp.SnnInterpreter.fire = fire
    for mode in (False, True):
        on["per_channel"] = mode
        for lam in args.lams:
            _row(args, graph, test, ann_pred, lam, per_channel=mode, lam=lam)


def sensitivity(args, graph, calib, test, ann_pred) -> None:
    sites = [s for s in graph.sites if s.attrs["kind"] == "dual"]
    x = calib.head(256)
    ann = interp.run(graph, x, spiking=False)
    set_scale(graph, args.lam0)

    class Only(interp.SnnInterpreter):
        target = ""

        def fire(self, node, a, event):
            return super().fire(node, a, event) if node.name == self.target else a[0]
    a_s = {}
    for s in sites:
        it = Only(graph)
        it.target = s.name
        with torch.no_grad():
            a_s[s.name] = float(((it.run(x) - ann) ** 2).mean()) / args.lam0 ** 2
    _, counter = measure(graph, load_data(args.data).sample(256, 0))
    layers = {c.name: c for c in counter.result().layers}
    e_ac, e_mac = energy_constants()
    d = {}
    for s in sites:
        c = layers.get(s.attrs["feeds"])
        b = (e_ac * c.ac + e_mac * c.mac) * args.lam0 if c is not None else 0.0
        d[s.name] = (b / a_s[s.name]) ** (1 / 3) if a_s[s.name] > 0 and b > 0 else 1.0
    g = math.exp(sum(math.log(v) for v in d.values()) / len(d))
    d = {k: v / g for k, v in d.items()}
    print(json.dumps({"model": args.model, "direction": {k: round(v, 3) for k, v in d.items()}}), flush=True)
    for mode in ("shared", "sensitivity"):
        for lam in args.lams:
            point = lam if mode == "shared" else {k: min(1.0, max(0.005, lam * v)) for k, v in d.items()}
            _row(args, graph, test, ann_pred, point, mode=mode, lam=lam)


def _features(node, inp: torch.Tensor) -> list[torch.Tensor]:
    """A weight layer's input as rows of features, one matrix per convolution group."""
    if node.op == "linear":
        return [inp.reshape(-1, inp.shape[-1])]
    a, groups, w = node.attrs, node.attrs.get("groups", 1), node.params["weight"]
    cols = torch.nn.functional.unfold(inp, w.shape[-2:], dilation=a.get("dilation", [1, 1]),
                                      padding=a.get("padding", [0, 0]), stride=a.get("stride", [1, 1]))
    per = cols.shape[1] // groups
    return [cols[:, i * per:(i + 1) * per].transpose(1, 2).reshape(-1, per) for i in range(groups)]


def _refit_layer(kind: str, node, s_in, out_snn, out_ann) -> tuple[torch.Tensor, torch.Tensor]:
    w = node.params["weight"]
    b = node.params.get("bias")
    b = torch.zeros(w.shape[0]) if b is None else b
    axis = 1 if node.op == "conv2d" else out_ann.dim() - 1
    t_ann = out_ann.transpose(axis, -1).reshape(-1, w.shape[0]).double()
    if kind == "affine":
        t_snn = out_snn.transpose(axis, -1).reshape(-1, w.shape[0]).double()
        ca, cs = t_ann - t_ann.mean(0), t_snn - t_snn.mean(0)
        a = ((ca * cs).sum(0) / (ca ** 2).sum(0).clamp_min(1e-12)).clamp(0.8, 1.25)
        shift = t_snn.mean(0) - a * t_ann.mean(0)
        return (w / a.float().view(-1, *[1] * (w.dim() - 1))), ((b - shift.float()) / a.float())
    if node.op == "conv2d":     # unfold's positions are row-major, as the output's transposed rows
        t_ann = out_ann.permute(0, 2, 3, 1).reshape(-1, w.shape[0]).double()
    feats = _features(node, s_in)
    per = w.shape[0] // len(feats)
    w2, b2 = torch.empty_like(w), torch.empty_like(b)
    for g, f in enumerate(feats):
        x = torch.cat([f, torch.ones(f.shape[0], 1)], 1).double()
        gram = x.T @ x
        gram += torch.eye(len(gram), dtype=gram.dtype) * 1e-3 * gram.diagonal()[:-1].mean().clamp_min(1e-12)
        sol = torch.linalg.solve(gram, x.T @ t_ann[:, g * per:(g + 1) * per])
        w2[g * per:(g + 1) * per] = sol[:-1].T.reshape(per, *w.shape[1:]).float()
        b2[g * per:(g + 1) * per] = sol[-1].float()
    return w2, b2


def refit(args, graph, calib, test, ann_pred) -> None:
    from sfn_deploy import bias_correction
    x = calib.head(256)
    for lam in args.lams:
        set_scale(graph, lam)
        _row(args, graph, test, ann_pred, lam, refit="none", lam=lam)
        bias_correction.apply(graph, bias_correction.shifts(graph, x))
        _row(args, graph, test, ann_pred, lam, refit="bias", lam=lam)
        bias_correction.revert(graph)
        for kind in ("affine", "lsq"):
            new = {}

            def refit_layer(layer, kind=kind, new=new):
                node = layer.node
                if torch.equal(layer.snn_inputs[0], layer.ann_inputs[0]):     # before the first site: as the ANN
                    return None
                new[node.name] = _refit_layer(kind, node, layer.snn_inputs[0], layer.snn, layer.ann)
                kept = dict(node.params)
                node.params.update(weight=new[node.name][0], bias=new[node.name][1])
                try:
                    return layer.rerun()
                finally:
                    node.params.clear()
                    node.params.update(kept)
            bias_correction.step_through(graph, x, refit_layer)
            source = {k: dict(graph[k].params) for k in new}
            for k, (w2, b2) in new.items():
                graph[k].params.update(weight=w2.contiguous(), bias=b2.contiguous())
            _row(args, graph, test, ann_pred, lam, refit=kind, lam=lam)
            for k, p in source.items():
                graph[k].params.clear()
                graph[k].params.update(p)


MODES = {"levels": levels, "refit": refit, "per-channel": per_channel, "sensitivity": sensitivity,
         "percentile": percentile}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=list(MODES))
    ap.add_argument("model")
    ap.add_argument("--data", required=True, help="calibration images (a --data form)")
    ap.add_argument("--test", required=True, help="test images (a --data form)")
    ap.add_argument("--lam", default="0.1,0.15,0.2,0.3")
    ap.add_argument("--levels", default="4,6,8,10", type=lambda v: [int(m) for m in v.split(",")],
                    help="levels: the global M values")
    ap.add_argument("--rounding", default="paper,nearest", type=lambda v: v.split(","), help="levels: rules")
    ap.add_argument("--fire", default="sformer", help="levels: the fire function")
    ap.add_argument("--pairs", type=lambda v: [(int(p.split(":")[0]), float(p.split(":")[1])) for p in v.split(",")],
                    help="levels: M:λ points to measure (paper rounding) instead of every --levels × --lam")
    ap.add_argument("--lam0", type=float, default=0.2, help="sensitivity: the λ the sensitivities are measured at")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    args.lams = [float(v) for v in args.lam.split(",")]
    torch.set_num_threads(args.threads)
    model, _ = load_model(args.model)
    test = load_data(args.test)
    test = test.sample(min(2000, len(test)), 1)
    calib = load_data(args.data)
    calib = calib.sample(min(2000, len(calib)), 0)
    graph = build_graph(model, calib, load_config("", {"scale": 1.0}), quiet=True)
    ann_pred, _ = measure(graph, test, spiking=False)
    MODES[args.mode](args, graph, calib, test, ann_pred)


if __name__ == "__main__":
    main()
