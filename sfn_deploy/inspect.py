"""What ``sfn-deploy inspect`` shows: the converted network in plain words."""
from __future__ import annotations

from collections import Counter

from . import backends
from .convert import PIPELINE
from .errors import UserError
from .methods import method_of, require_single_step
from .model_file import ConvertedModel
from .preprocess import Preprocess
from .targets import available


def summary(model: ConvertedModel) -> dict:
    g = model.graph
    sites = []
    for s in g.sites:
        a = s.attrs
        sites.append({"name": s.name, "role": a["role"], "kind": a["kind"], "source": s.source,
                      "neurons": _numel(s.shape), "theta_pos": a["theta_pos"], "theta_neg": a["theta_neg"],
                      "o_max": a.get("o_max"), "lam": a["lam"], "step_pos": float(s.params["steps"][0]),
                      "step_neg": float(s.params["steps"][1]), "levels": len(a["levels"]),
                      "top_level": max(a["levels"]), "feeds": a.get("feeds")})
    kinds = Counter(n.kind for n in g.nodes)
    layers = [{"name": n.name, "op": n.op, "kind": n.kind, "inputs": n.inputs, "shape": n.shape,
               "source": n.source} for n in g.nodes]
    method, steps = method_of(g)
    return {"format_version": 1, "method": method, "timesteps": steps, "source": model.source,
            "input_shape": model.input_shape,
            "preprocessing": None if model.preprocessing is None else model.preprocessing.to_dict(),
            "classes": model.classes, "output_parts": g.output_parts, "config": model.config,
            "passes": [p.name for p in PIPELINE],
            "node_kinds": dict(kinds),
            "layers": layers, "sites": sites, "metrics": model.metrics,
            "pareto_front": model.search.get("pareto_front", []), "chosen": model.search.get("chosen"),
            "targets": available(), "exporters": exporters(model),
            "backends": {name: e.description for name, e in backends.BACKENDS.items()}}


def exporters(model: ConvertedModel) -> dict:
    """What each export target makes of this network (without writing anything)."""
    targets = backends.export_targets()
    try:
        require_single_step(model, "single-timestep")
    except UserError:
        why = f"refused: --method {model.graph.method} keeps state over T = {model.graph.timesteps} steps"
        return {name: why for name in targets}
    return {name: backends.get_exporter(name).support(model) for name in targets}


def _softmax_levels(sites: list[dict]) -> str:
    """How the post-softmax neurons' levels were set (docs/concepts.md "The neuron"), or nothing without any."""
    soft = [x for x in sites if x["kind"] == "softmax"]
    if not soft:
        return ""
    dense = all(x["levels"] == x["top_level"] for x in soft)
    return f", post-softmax levels {'dense' if dense else 'of the fire function'} (top {soft[0]['top_level']})"


def _numel(shape) -> int:
    out = 1
    for s in shape:
        out *= int(s)
    return out


def _classes(names: list[str] | None) -> str:
    return f"; {len(names)} classes ({', '.join(names[:5])}{', ...' if len(names) > 5 else ''})" if names else ""


def summary_text(s: dict) -> str:
    cfg = s["config"]
    method = s.get("method", "sfn")
    pre = s.get("preprocessing")
    lines = [f"source: {s['source'].get('spec', '?')}   input: {'×'.join(map(str, s['input_shape']))}",
             "images: " + (Preprocess.from_dict(pre).describe() if pre else "no preprocessing recorded")
             + _classes(s.get("classes")),
             f"fire function {cfg.get('fire')} (M = {cfg.get('levels')}), rounding {cfg.get('rounding')}, "
             f"p = {cfg.get('percentile')}%{_softmax_levels(s['sites'])}" if method == "sfn" else
             f"method {method} (docs/methods.md), T = {s['timesteps']}, p = {cfg.get('percentile')}%",
             "passes: " + " → ".join(s["passes"]),
             "nodes: " + ", ".join(f"{v} {k}" for k, v in sorted(s["node_kinds"].items())),
             "", "layers:"]
    for n in s["layers"]:
        lines.append(f"  {n['name']:<44} {n['op']:<20} {n['kind']:<8} {'×'.join(map(str, n['shape'][1:])):<14} "
                     f"{n['source'][:48]}")
    lines += ["", f"SFN sites ({len(s['sites'])}):",
              f"  {'name':<44} {'role':<13} {'neurons':>8} {'θ⁺':>9} {'θ⁻':>9} {'λ':>6} {'step⁺':>10} top"]
    for x in s["sites"]:
        lines.append(f"  {x['name']:<44} {x['role']:<13} {x['neurons']:>8} {x['theta_pos']:>9.4g} "
                     f"{x['theta_neg']:>9.4g} {x['lam']:>6.3f} {x['step_pos']:>10.4g} {x['top_level']}")
    m = s["metrics"]
    scored = (f"cosine similarity {m['cosine']:.4f} (SNN outputs against the ANN's)" if m.get("cosine") is not None
              else f"ANN {m['ann_accuracy']:.2f}%  SNN {m['accuracy']:.2f}%" if m.get("accuracy") is not None
              else f"agreement {m['agreement']:.2f}% (unlabeled)" if m.get("agreement") is not None else None)
    if scored and "energy_ratio" in m and "samples" in m:
        lines += ["", f"validation at conversion ({m.get('samples')} samples): {scored}  "
                      f"energy ratio {m['energy_ratio']:.4f}"]
    if s.get("output_parts"):
        lines += [f"output: {len(s['output_parts'])} tensors joined per sample, shapes "
                  + ", ".join('×'.join(map(str, p)) for p in s["output_parts"])]
    if s["pareto_front"]:
        lines += ["", "λ search Pareto front (accuracy ↑, energy ratio ↓):"]
        for r in s["pareto_front"]:
            mark = "  ← chosen" if s["chosen"] and r["trial"] == s["chosen"]["trial"] else ""
            lams = sorted(set(round(v, 3) for v in r["lam"].values()))
            lam = str(lams[0]) if len(lams) == 1 else f"{min(lams)}..{max(lams)}"
            lines.append(f"  trial {r['trial']:4d}  {r['accuracy']:6.2f}%  ratio {r['energy_ratio']:.4f}  "
                         f"λ {lam}{mark}")
    lines += ["", "hardware targets: " + ", ".join(s["targets"])]
    lines += ["exports:"] + [f"  {k:<5} {v}" for k, v in s["exporters"].items()]
    return "\n".join(lines)
