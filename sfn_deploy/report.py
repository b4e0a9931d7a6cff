"""Hardware-planning reports: one counting pass over the data, then every target's mapping and estimate.

The report is a plain dict (the JSON of ``sfn-deploy report --json``, keys in SPEC §6);
:mod:`sfn_deploy.render` turns it into Markdown or a self-contained HTML page.
"""
from __future__ import annotations

import copy
import os
from typing import Any

import torch

from .data import Dataset
from .errors import UserError
from .evaluation import accuracy, backend_logits, check_data, energy_constants, measure
from .ir import NEURON_OPS
from .methods import method_of
from .model_file import ConvertedModel
from .neurons import fire_levels
from .passes import configure, set_scale
from .simulators.counting import CONVENTIONS, OpCounts, count_ops
from .simulators.estimate import estimate
from .targets import load_target
from .targets.mapping import map_network


def variant(converted: ConvertedModel, scale: float | None = None, levels: int | None = None) -> ConvertedModel:
    """A copy of the converted network with another shared λ and/or another M (θ and calibration kept)."""
    if converted.graph.method != "sfn" and (scale is not None or levels is not None):
        raise UserError(f"--scale and --levels vary an SFN network; this one was converted with --method "
                        f"{converted.graph.method}")
    out = copy.deepcopy(converted)
    if levels is not None:
        for s in out.sites:
            s.attrs["M"] = levels
            s.attrs["levels"] = fire_levels(levels, s.attrs["fire"])
            configure(s, s.attrs["lam"])
    if scale is not None:
        set_scale(out.graph, scale)
    return out


def _summary_layers(counts: OpCounts) -> list[dict]:
    keep = ("name", "op", "kind", "source", "stage", "input", "mac_ann", "ac", "ac_event", "ac_channel", "mac",
            "host_ops", "spikes", "active", "channel_spikes", "neurons", "weights", "fan_in", "levels",
            "firing_rate", "level_hist")
    return [{k: d[k] for k in keep if k in d} for d in counts.reported_layers()]


def channel_cost(converted: ConvertedModel, counts: OpCounts) -> dict:
    """What lowering every multi-spike neuron to binary threshold channels costs (Loihi 1, NIR):
    one neuron per channel, and one synapse per incoming channel (the level increment folded into it)."""
    from .targets.mapping import _source_site
    stats = {c.name: c for c in counts.layers}
    channels = {c.name: c.levels * (2 if c.dual else 1) for c in counts.layers if c.op in NEURON_OPS}
    syn_graded = syn_channels = 0
    for c in counts.layers:
        if c.kind == "weight":
            src = _source_site(converted.graph, converted.graph[c.name].inputs[0])
            syn_graded += c.connections
            syn_channels += c.connections * (channels[src.name] if src is not None else 1)
    neurons = sum(stats[n].neurons for n in channels)
    return {"neurons_graded": neurons, "neurons_channels": sum(stats[n].neurons * k for n, k in channels.items()),
            "synapses_graded": syn_graded, "synapses_channels": syn_channels}


def lava_placement(converted: ConvertedModel) -> dict:
    """Where each part of the network runs in the Lava target (graded lowering): neuro-core processes
    (neurons, synaptic layers) and host processes with the operations they do."""
    from .exporters.lava import lower
    try:
        p = lower(converted, "graded", "floating_pt")
    except UserError as e:
        return {"error": str(e)}
    host = [{"block": b.name, "ops": b.attrs["ops"], "stage": b.stage} for b in p.blocks
            if b.kind == "host" and b.attrs["ops"]]
    return {**p.summary(), "host_blocks": host}


def plan(converted: ConvertedModel, counts: OpCounts, targets: list[str]) -> dict:
    """Mapping and estimate for each target (no data pass: reuses ``counts``)."""
    out = {}
    for name in targets:
        t = load_target(name)
        m = map_network(converted.graph, counts, t)
        out[t.name] = {"description": t.description, "spikes": t.spikes, "path": t.path,
                       "mapping": m.to_dict(), "estimate": estimate(converted.graph, counts, t, m)}
    return out


def build_report(converted: ConvertedModel, data: Dataset, targets: list[str], *, label: str = "",
                 batch_size: int = 256, quiet: bool = True) -> dict:
    check_data(converted.graph, data, "converted model")
    if not targets:
        raise UserError("no target given")
    snn_pred, counter = measure(converted.graph, data, batch_size, quiet=quiet, desc="counting")
    ann_pred = backend_logits(converted, data, "torch", batch_size, ann=True, quiet=quiet).argmax(-1)
    counts = counter.result()
    e_ac, e_mac = energy_constants("cmos45")
    lams = [s.attrs["lam"] for s in converted.sites]
    report: dict[str, Any] = {
        "model": label, "source": converted.source, "samples": len(data),
        "levels_M": sorted({s.attrs["M"] for s in converted.sites}),
        "fire": sorted({s.attrs["fire"] for s in converted.sites}),
        "lam": {"min": min(lams), "max": max(lams)} if lams else {},
        "accuracy": accuracy(snn_pred, data.y), "ann_accuracy": accuracy(ann_pred, data.y),
        "agreement": 100.0 * float((snn_pred == ann_pred).float().mean()),
        "energy_ratio": counts.energy_ratio(e_ac, e_mac),
        "energy_ratio_approx": counts.energy_ratio_approx(e_ac, e_mac),
        "energy_ratio_by_convention": {c: counts.energy_ratio(e_ac, e_mac, c) for c in CONVENTIONS},
        "ac_snn": counts.ac_snn, "mac_snn": counts.mac_snn, "mac_ann": counts.mac_ann, "host_ops": counts.host_ops,
        "synops": {c: counts.synops(c) for c in CONVENTIONS}, "host_ops_by_op": counts.host_ops_by_op(),
        "neuron_updates": sum(c.neurons * c.timesteps for c in counts.layers if c.op in NEURON_OPS)
        + sum(c.bases * c.timesteps for c in counts.layers if c.bases),     # MBE: basis units × internal steps
        "spikes": sum(c.spikes for c in counts.layers if c.op in NEURON_OPS or c.bases),
        "method": method_of(converted.graph)[0], "timesteps": method_of(converted.graph)[1],
        "channel_decomposition": channel_cost(converted, counts),
        "lava": lava_placement(converted),
        "layers": _summary_layers(counts), "stages": counts.per_stage(),
        "targets": plan(converted, counts, targets),
    }
    first = next(iter(report["targets"].values()))["estimate"]
    report["target"] = {k: first[k] for k in ("target", "cores", "chips", "energy_j", "latency_s", "throughput_per_s")}
    return report


def summary_row(r: dict) -> dict:
    """One line per report for comparison tables: accuracy, the paper's ratio, and each target's figures."""
    row = {"model": r["model"], "method": r.get("method", "sfn"), "timesteps": r.get("timesteps", 1),
           "M": r["levels_M"], "lam": r["lam"], "accuracy": r["accuracy"],
           "ann_accuracy": r["ann_accuracy"], "energy_ratio": r["energy_ratio"]}
    for name, t in r["targets"].items():
        e = t["estimate"]
        row[name] = {"energy_j": e["energy_j"], "latency_s": e["latency_s"], "cores": e["cores"], "chips": e["chips"],
                     "fits": t["mapping"]["fits"], "snn_over_int8_ann": e["snn_over_int8_ann"]}
    return row


def compare(reports: list[dict]) -> dict:
    return {"comparison": [summary_row(r) for r in reports], "reports": reports}


def count_static(converted: ConvertedModel) -> OpCounts:
    """Counts of one all-zero sample: enough for the mapping's static quantities (shapes, weights, limits)."""
    return count_ops(converted.graph, [torch.zeros(1, *converted.input_shape)])


def output_format(path: str | None) -> str:
    if path is None:
        return "text"
    ext = os.path.splitext(path)[1].lower()
    formats = {".json": "json", ".md": "md", ".markdown": "md", ".html": "html", ".htm": "html"}
    if ext not in formats:
        raise UserError(f"{path}: unknown report format {ext or '(none)'}; use .json, .md or .html")
    return formats[ext]
