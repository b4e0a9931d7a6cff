"""Per-layer parity between two backends: which SFN site is the first to disagree, and by how much.

Every backend gives, for the same samples, the network output and (where it can) each SFN site's
integer spike levels and pre-activations (the neuron's input). Sites are compared in graph order,
so the first one that differs is where the two simulations part ways; everything after it inherits
the difference.

Per-layer data per backend: torch (levels and pre-activations, from the reference interpreter),
onnx (levels, from the level-output export), lava (levels and membrane potentials read from the
neurons' taps; fixed point dequantised with the neuron's scale), nir (levels decoded from each
site's threshold channels as nirtorch computes them).
"""
from __future__ import annotations

import numpy as np
import torch

from .data import Dataset
from .errors import UserError
from .model_file import ConvertedModel
from .runtime import run, signed_table


def _torch_layers(model: ConvertedModel, x: torch.Tensor, batch_size: int) -> dict:
    levels: dict = {}
    pre: dict = {}
    outs = []

    def keep(node, args, out, extra):
        if "position" in extra:
            pos = extra["position"]
            lv = torch.index_select(signed_table(node), 0, pos.reshape(-1)).view(pos.shape)
            levels.setdefault(node.name, []).append(lv.reshape(lv.shape[0], -1).numpy())
            pre.setdefault(node.name, []).append(args[0].reshape(args[0].shape[0], -1).numpy())
    for i in range(0, len(x), batch_size):
        outs.append(run(model.graph, x[i:i + batch_size], hook=keep).numpy())
    cat = lambda d: {k: np.concatenate(v) for k, v in d.items()}     # noqa: E731
    return {"outputs": np.concatenate(outs), "levels": cat(levels), "pre": cat(pre)}


def _onnx_layers(model: ConvertedModel, x: torch.Tensor, batch_size: int) -> dict:
    from .exporters.onnx import OnnxRunner, to_onnx
    runner = OnnxRunner(to_onnx(model, levels=True))
    outs, levels = [], {}
    for i in range(0, len(x), batch_size):
        y, lv = runner.run_with_levels(x[i:i + batch_size].numpy())
        outs.append(y)
        for k, v in lv.items():
            levels.setdefault(k, []).append(v.reshape(v.shape[0], -1).astype(np.int64))
    return {"outputs": np.concatenate(outs), "levels": {k: np.concatenate(v) for k, v in levels.items()}, "pre": {}}


def _channel_levels(site, ch: torch.Tensor) -> torch.Tensor:
    """Signed levels from binary threshold channels (batch, G, ...), positive copies first: the level is
    table[#positive fired] − table[#negative fired] (channels of a level are cumulative)."""
    npos, table = site.params["bounds_pos"].numel(), site.params["table"]
    ch = ch.round().long()
    lv = table[ch[:, :npos].sum(1)]
    return lv - table[ch[:, npos:].sum(1)] if ch.shape[1] > npos else lv


def _nir_layers(model: ConvertedModel, x: torch.Tensor, batch_size: int) -> dict:
    """Levels decoded from each site's threshold channels (copy index outermost: the positive copies,
    then the negative ones; the level is table[#positive fired] − table[#negative fired])."""
    from .convert import backend_runner
    from .exporters.nir import PartialModule, run_partial
    runner = backend_runner(model, "nir")
    if isinstance(runner, PartialModule):          # sites inside NIR regions: channels (batch, G, *shape)
        y, spikes = run_partial(runner, x, spikes=True, batch_size=batch_size)
        levels = {s.name: _channel_levels(s, spikes[s.name]).reshape(len(x), -1).numpy()
                  for s in model.sites if s.name in spikes}
        return {"outputs": y.numpy(), "levels": levels, "pre": {}}
    modules = dict(runner.named_modules())
    levels: dict = {}
    hooks = []
    for site in model.sites:
        mod = modules.get(f"graph_module.{site.name}")
        if mod is None:
            continue
        g = site.params["bounds_pos"].numel() + site.params["bounds_neg"].numel()

        def keep(_m, _inp, out, site=site, g=g):
            levels.setdefault(site.name, []).append(_channel_levels(site, out.reshape(out.shape[0], g, -1)).numpy())
        hooks.append(mod.register_forward_hook(keep))
    try:
        outs = [runner(x[i:i + batch_size]).numpy() for i in range(0, len(x), batch_size)]
    finally:
        for h in hooks:
            h.remove()
    return {"outputs": np.concatenate(outs), "levels": {k: np.concatenate(v) for k, v in levels.items()}, "pre": {}}


def _lava_layers(model: ConvertedModel, x: torch.Tensor, lava: dict | None) -> dict:
    from .exporters.lava import LavaRunner
    runner = LavaRunner(model, record=True, **(lava or {}))
    y = runner(x).numpy()
    r = runner.last
    pre = {k: v.astype(np.float64) * r["scales"].get(k, 1.0) for k, v in r["pre"].items()}
    return {"outputs": y, "levels": {k: v.astype(np.int64) for k, v in r["levels"].items()}, "pre": pre,
            "counts": r["counts"], "timings": r["timings"]}


def layer_outputs(model: ConvertedModel, backend: str, data: Dataset, batch_size: int = 256,
                  lava: dict | None = None) -> dict:
    """Output, and per-site levels / pre-activations where the backend exposes them."""
    x = data.x
    if backend == "torch":
        return _torch_layers(model, x, batch_size)
    if backend == "onnx":
        return _onnx_layers(model, x, batch_size)
    if backend == "lava":
        return _lava_layers(model, x, lava)
    if backend == "nir":
        return _nir_layers(model, x, batch_size)
    raise UserError(f"no per-layer parity for backend {backend!r}")


def compare(model: ConvertedModel, ref: dict, other: dict, ref_name: str, other_name: str) -> dict:
    """Site by site in graph order: share of equal levels, largest level difference, samples affected,
    largest pre-activation difference; and the first site that differs."""
    layers = []
    first = None
    for site in model.sites:
        name = site.name
        row = {"site": name, "role": site.attrs.get("role")}
        if name in ref["levels"] and name in other["levels"]:
            a, b = ref["levels"][name], other["levels"][name]
            if a.shape != b.shape:
                raise UserError(f"parity: {name} has shape {a.shape} on {ref_name} and {b.shape} on {other_name}")
            diff = a != b
            row.update(levels_equal=100.0 * float(1 - diff.mean()), max_level_diff=int(np.abs(a - b).max()),
                       samples_differing=int(diff.any(axis=1).sum()))
            if first is None and diff.any():
                first = {"site": name, "levels_equal": row["levels_equal"], "max_level_diff": row["max_level_diff"],
                         "samples_differing": row["samples_differing"]}
        else:
            row["levels_equal"] = None
        if name in ref["pre"] and name in other["pre"]:
            d = np.abs(ref["pre"][name].astype(np.float64) - other["pre"][name].astype(np.float64))
            row["max_pre_diff"] = float(d.max())
            if first is not None and first["site"] == name:
                first["max_pre_diff"] = row["max_pre_diff"]
        layers.append(row)
    out = np.abs(ref["outputs"].astype(np.float64) - other["outputs"].astype(np.float64))
    agree = ref["outputs"].reshape(len(out), -1).argmax(-1) == other["outputs"].reshape(len(out), -1).argmax(-1)
    return {"reference": ref_name, "backend": other_name, "samples": int(len(out)), "layers": layers,
            "first_differing": first, "output_max_abs_diff": float(out.max()),
            "prediction_agreement": 100.0 * float(agree.mean()),
            "compared_sites": sum(r["levels_equal"] is not None for r in layers)}


def parity(model: ConvertedModel, data: Dataset, backends: list[str], against: str = "torch",
           batch_size: int = 256, lava: dict | None = None) -> list[dict]:
    ref = layer_outputs(model, against, data, batch_size, lava)
    rows = [compare(model, ref, layer_outputs(model, b, data, batch_size, lava), against, b)
            for b in backends if b != against]
    if "lava" in backends + [against]:
        for r in rows:
            r["lava"] = {"precision": (lava or {}).get("precision", "floating_pt"),
                         "lowering": (lava or {}).get("lowering", "graded")}
    return rows


def format_parity(r: dict) -> str:
    lava = f" [Lava {r['lava']['precision']}, {r['lava']['lowering']}]" if "lava" in r else ""
    lines = [f"per-layer parity, {r['backend']} against {r['reference']}{lava} ({r['samples']} samples): "
             f"outputs max|Δ| {r['output_max_abs_diff']:.3g}, top-1 agreement {r['prediction_agreement']:.2f}%"]
    for row in r["layers"]:
        if row["levels_equal"] is None:
            lines.append(f"  {row['site']:<45} (no per-layer data on one side)")
            continue
        pre = f"  pre max|Δ| {row['max_pre_diff']:.3g}" if "max_pre_diff" in row else ""
        lines.append(f"  {row['site']:<45} levels equal {row['levels_equal']:8.4f}%  max|Δlevel| "
                     f"{row['max_level_diff']:<4} samples differing {row['samples_differing']:<5}{pre}")
    f = r["first_differing"]
    if f:
        lines.append(f"first differing layer: {f['site']} ({100 - f['levels_equal']:.4f}% of levels differ, "
                     f"by up to {f['max_level_diff']}, in {f['samples_differing']} samples)")
    elif r["compared_sites"]:
        lines.append("every compared layer is identical")
    return "\n".join(lines)
