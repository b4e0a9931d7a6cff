"""Hardware-planning reports: one counting pass over the data, then every target's mapping and estimate.

The report is a :class:`Report` (its ``to_dict()`` is the JSON of ``sfn-deploy report --json``, keys in
SPEC §6); several side by side are a :class:`Comparison`. :mod:`sfn_deploy.render` turns either into
Markdown or a self-contained HTML page.
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from typing import Any

import torch

from . import fidelity
from .data import Dataset
from .errors import UserError
from .evaluation import (
    PairedDrop,
    accuracy_figures,
    check_data,
    compare_outputs,
    energy_constants,
    measure,
    output_figures,
    predict,
)
from .ir import NEURON_OPS
from .methods import method_of
from .model_file import ConvertedModel
from .passes import set_levels, set_scale
from .planning import PlanRow, rank
from .pooling import pooling_layers
from .results import Result, optional
from .simulators.counting import CONVENTIONS, OpCounts, count_ops
from .simulators.estimate import Estimate, plan_target
from .targets import load_target
from .targets.mapping import Mapping, source_site


@dataclass
class ChannelCost(Result):
    """Neurons and stored synapses with graded spikes, and with binary threshold channels instead (counts)."""
    neurons_graded: int
    neurons_channels: int
    synapses_graded: int
    synapses_channels: int


@dataclass
class TargetPlan(Result):
    """One target's core mapping and its energy/latency estimate per inference."""
    description: str
    spikes: str                         # the target's spike kind: none, binary or graded
    path: str                           # the target file read
    mapping: Mapping
    estimate: Estimate
    runs: str | None = optional()       # "ann" on a dense engine that runs the source ANN (a baseline)


@dataclass
class Headline(Result):
    """The first target's headline figures: cores, chips, energy (J) and latency (s) per inference."""
    target: str
    cores: int
    chips: int
    energy_j: float
    latency_s: float | None
    throughput_per_s: float | None      # inferences per second, streaming


@dataclass
class Report(Result):
    """A hardware-planning report of one network on data: accuracy, op counts per inference, every target."""
    model: str                          # the label (file name, λ and M of a variant)
    source: dict[str, Any]              # where the converted model came from (spec, sha256)
    samples: int
    levels_M: list[int]
    fire: list[str]
    lam: dict[str, float]               # smallest and largest λ ({} without sites)
    accuracy: float | None              # SNN top-1, % (None: unlabeled data)
    ann_accuracy: float | None          # source ANN top-1, % (None: unlabeled data)
    agreement: float | None             # SNN/ANN top-1 agreement, % (None: output fidelity)
    energy_ratio: float                 # the paper's eq. 43, 45 nm CMOS prices
    energy_ratio_approx: float          # eq. 44 (first layer's MACs dropped)
    energy_ratio_by_convention: dict[str, float]
    ac_snn: float                       # accumulates per inference (spike convention)
    mac_snn: float                      # MACs per inference of layers with analog input
    mac_ann: float                      # MACs per inference of the source ANN
    host_ops: float                     # host operations per inference
    synops: dict[str, float]            # synaptic ops per inference under each convention
    host_ops_by_op: dict[str, float]
    neuron_updates: float               # per inference
    spikes: float                       # Σ|y| per inference
    method: str
    timesteps: int
    channel_decomposition: ChannelCost
    lava: dict[str, Any]                # the Lava plan's placement (or {"error": why})
    layers: list[dict[str, Any]]        # per-layer op counts per inference
    stages: list[dict[str, Any]]        # per pipeline stage totals per inference
    targets: dict[str, TargetPlan]
    target: Headline
    planning: list[PlanRow] | None = optional()     # the targets ranked (several targets only)
    drop: PairedDrop | None = optional()            # ANN − SNN accuracy, points, with its paired 95 % interval
    fidelity: str | None = optional()               # "output": scored by cosine similarity (None: accuracy)
    cosine: float | None = optional()               # output fidelity: mean SNN/ANN cosine similarity
    relative_error: float | None = optional()       # output fidelity: mean ‖SNN − ANN‖ / ‖ANN‖, %
    cosine_parts: list[float] | None = optional()   # several joined outputs: each one's mean cosine


@dataclass
class Comparison(Result):
    """Several reports side by side: one summary row each, then the reports."""
    comparison: list[dict[str, Any]]
    reports: list[Report]


def variant(converted: ConvertedModel, scale: float | None = None, levels: int | None = None) -> ConvertedModel:
    """A copy of the converted network with another shared λ and/or another M (θ and calibration kept)."""
    if converted.graph.method != "sfn" and (scale is not None or levels is not None):
        raise UserError(f"--scale and --levels vary an SFN network; this one was converted with --method "
                        f"{converted.graph.method}")
    out = copy.deepcopy(converted)
    if levels is not None:
        # a model converted before post-softmax levels were dense has no softmax_levels: it had the fire's
        set_levels(out.graph, levels, converted.config.get("softmax_levels", "fire"))
    if scale is not None:
        set_scale(out.graph, scale)
    return out


def _summary_layers(counts: OpCounts) -> list[dict]:
    keep = ("name", "op", "kind", "source", "stage", "input", "mac_ann", "ac", "ac_event", "ac_channel", "mac",
            "host_ops", "spikes", "active", "channel_spikes", "neurons", "weights", "fan_in", "levels",
            "firing_rate", "level_hist")
    return [{k: d[k] for k in keep if k in d} for d in counts.reported_layers()]


def channel_cost(converted: ConvertedModel, counts: OpCounts) -> ChannelCost:
    """What lowering every multi-spike neuron to binary threshold channels costs (Loihi 1, NIR):
    one neuron per channel, and one synapse per incoming channel (the level increment folded into it)."""
    stats = {c.name: c for c in counts.layers}
    channels = {c.name: c.levels * (2 if c.dual else 1) for c in counts.layers if c.op in NEURON_OPS}
    syn_graded = syn_channels = 0
    for c in counts.layers:
        if c.kind == "weight":
            src = source_site(converted.graph, converted.graph[c.name].inputs[0])
            syn_graded += c.connections
            syn_channels += c.connections * (channels[src.name] if src is not None else 1)
    neurons = sum(stats[n].neurons for n in channels)
    return ChannelCost(neurons_graded=neurons, neurons_channels=sum(stats[n].neurons * k for n, k in channels.items()),
                       synapses_graded=syn_graded, synapses_channels=syn_channels)


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


def plan(converted: ConvertedModel, counts: OpCounts, targets: list[str]) -> dict[str, TargetPlan]:
    """Mapping and estimate for each target (no data pass: reuses ``counts``)."""
    out = {}
    for name in targets:
        t = load_target(name)
        m, e = plan_target(converted.graph, counts, t)
        out[t.name] = TargetPlan(description=t.description, spikes=t.spikes, path=t.path, mapping=m, estimate=e,
                                 runs="ann" if t.runs == "ann" else None)
    return out


AUTO_TARGET = "loihi2"     # the graded chip whose figures choose --avg-pool auto (Lava's graded lowering)
AUTO_SAMPLES = 256         # samples of --data counted for that choice


def avg_pool_choice(converted: ConvertedModel, data: Dataset, quiet: bool = True) -> tuple[str, str]:
    """The average-pooling form Lava should build (``export --avg-pool auto``): the one :data:`AUTO_TARGET`'s
    estimate keeps on a counting pass over the first :data:`AUTO_SAMPLES` samples, and why, in words."""
    none = "folded", "no average pooling of spikes can run as a pooling layer"
    if not pooling_layers(converted.graph):
        return none
    _, counter = measure(converted.graph, data.limit(AUTO_SAMPLES), quiet=quiet, desc="counting")
    counts = counter.result()
    t = load_target(AUTO_TARGET)
    _, e = plan_target(converted.graph, counts, t)
    a = e.avg_pool
    if a is None:
        return none
    f, lay = a["folded"], a["layer"]
    why = (f"{t.name} estimate on {counts.samples:,} samples: folded {f['total_j'] * 1e6:.4g} µJ, pooling layers "
           f"{lay['total_j'] * 1e6:.4g} µJ per inference" + (f"; as layers: {', '.join(lay['breaks'])}"
                                                             if lay["breaks"] else ""))
    return a["chosen"], why


def build_report(converted: ConvertedModel, data: Dataset, targets: list[str], *, label: str = "",
                 batch_size: int = 256, quiet: bool = True) -> Report:
    kind = fidelity.of(converted.config)
    check_data(converted.graph, data, "converted model", kind)
    if not targets:
        raise UserError("no target given")
    if kind == "output":
        scores, counter = compare_outputs(converted.graph, data, batch_size, quiet=quiet, desc="counting",
                                          split=True)
        scored = output_figures(scores)
    else:
        snn_pred, counter = measure(converted.graph, data, batch_size, quiet=quiet, desc="counting", split=True)
        ann_pred = predict(converted.graph, data, batch_size, quiet=quiet, desc="ANN", split=True)
        scored = accuracy_figures(data, snn_pred, ann_pred)
    counts = counter.result()
    e_ac, e_mac = energy_constants("cmos45")
    lams = [s.attrs["lam"] for s in converted.sites]
    method, timesteps = method_of(converted.graph)
    plans = plan(converted, counts, targets)
    first = next(iter(plans.values())).estimate
    return Report(
        model=label, source=converted.source, samples=len(data),
        levels_M=sorted({s.attrs["M"] for s in converted.sites}),
        fire=sorted({s.attrs["fire"] for s in converted.sites}),
        lam={"min": min(lams), "max": max(lams)} if lams else {},
        energy_ratio=counts.energy_ratio(e_ac, e_mac),
        energy_ratio_approx=counts.energy_ratio_approx(e_ac, e_mac),
        energy_ratio_by_convention={c: counts.energy_ratio(e_ac, e_mac, c) for c in CONVENTIONS},
        ac_snn=counts.ac_snn, mac_snn=counts.mac_snn, mac_ann=counts.mac_ann, host_ops=counts.host_ops,
        synops={c: counts.synops(c) for c in CONVENTIONS}, host_ops_by_op=counts.host_ops_by_op(),
        neuron_updates=sum(c.neurons * c.timesteps for c in counts.layers if c.op in NEURON_OPS)
        + sum(c.bases * c.timesteps for c in counts.layers if c.bases),     # MBE: basis units × internal steps
        spikes=sum(c.spikes for c in counts.layers if c.op in NEURON_OPS or c.bases),
        method=method, timesteps=timesteps,
        channel_decomposition=channel_cost(converted, counts),
        lava=lava_placement(converted),
        layers=_summary_layers(counts), stages=counts.per_stage(),
        targets=plans,
        target=Headline(target=first.target, cores=first.cores, chips=first.chips, energy_j=first.energy_j,
                        latency_s=first.latency_s, throughput_per_s=first.throughput_per_s),
        planning=rank(plans) if len(plans) > 1 else None, **scored)


def summary_row(r: Report) -> dict:
    """One line per report for comparison tables: accuracy, the paper's ratio, and each target's figures."""
    row: dict[str, Any] = {"model": r.model, "method": r.method, "timesteps": r.timesteps, "M": r.levels_M,
                           "lam": r.lam, "accuracy": r.accuracy, "ann_accuracy": r.ann_accuracy,
                           "energy_ratio": r.energy_ratio}
    for name, t in r.targets.items():
        e = t.estimate
        row[name] = {"energy_j": e.energy_j, "latency_s": e.latency_s, "cores": e.cores, "chips": e.chips,
                     "fits": t.mapping.fits, "snn_over_int8_ann": e.snn_over_int8_ann}
    return row


def compare(reports: list[Report]) -> Comparison:
    return Comparison(comparison=[summary_row(r) for r in reports], reports=reports)


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
