"""Energy and latency per inference: exact counts × a target's named, sourced prices.

Every term says whether it is priced and by which figure; a term the target file has no figure
for is listed as unpriced instead of being silently dropped (SPEC §5: a planner must be able to
audit every number). Two kinds of target:

- arithmetic (``spikes = "none"``, e.g. cmos45): synaptic ops at E_AC, analog-input layers at
  E_MAC, plus weight-memory reads where ``memory_bit`` is given (one read of ``weight_bits`` per
  non-zero input per fan-out, and per MAC). The paper's ratio is this model without memory.
- neuromorphic (loihi1, loihi2): synaptic ops under the target's convention at E_synop (graded
  payload multiply if priced), neuron updates (active / silent), one spike message per graded
  event or per binary channel spike, static power × latency. Host work (LayerNorm, softmax, GELU,
  residual arithmetic, attention products, the analog input layer) is unpriced unless the target
  gives ``host_op``.

Latency (targets with ``[time_ns]`` and cores): a layer spread over k cores takes
(synops·t_syn + updates·t_upd + messages·t_spike)/k per timestep; a pipeline stage takes its
slowest layer (at least ``timestep`` on a clocked chip), a timestep adds a barrier. Streaming
(pipelined) samples leave one per step of the slowest stage; a single inference takes the sum of
its stages. A multi-timestep network (IF, ECMT over T steps) spreads its work over T steps, updates
every compartment T times, and takes T - 1 steps more. Host stages are not timed. Arithmetic
targets with ``time_ns.mac`` do their operations one after another at the sustained rate.
``scope = "all_in"``: the synop (MAC) price already covers updates, messages, memory and static
power; those terms are listed as included. ``runs = "ann"``: a dense engine priced on the source
ANN's MACs (the baseline a planner compares against).
The ANN baselines price the source ANN's MACs on the same table: at the target's own E_MAC
(arithmetic targets: fp32 on cmos45, int8 on cmos45_int8, ...) and int8 from ``[ann_int8]``, with
and without weight-memory reads. Static energy is given per single inference (latency × power) and,
as ``energy_streaming_j``, per inference of a pipelined stream (step time × power).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from sfn_deploy.ir import NEURON_OPS
from sfn_deploy.results import Result, optional
from sfn_deploy.targets.mapping import POOLING_LAYER, RELAY, SHORTCUT, Mapping, map_network
from sfn_deploy.targets.schema import Target

PJ = 1e-12


@dataclass
class EnergyTerm(Result):
    """One line of the energy bill per inference: a count (operations, bits, or seconds) times a named price."""
    term: str
    count: float | None                 # per inference: operations, bits read, or seconds (static power)
    unit: str | None = optional()       # set when the count is not a number of operations ("seconds")
    what: str = ""
    price: str | None = None            # the target file's figure, "section.key"; None where there is none
    pj_each: float | None = None        # pJ per counted unit (None: not priced, or priced in watts)
    joules: float | None = None         # J per inference; None when not priced
    priced: bool = False
    source: str = ""                    # the figure's published source
    evidence: str = ""                  # the figure's evidence grade ("proxy": another chip's figure)
    included_in: str | None = optional()    # the all-in price that already covers this term


@dataclass
class LatencyStage(Result):
    """One pipeline stage's time per timestep: its slowest layer, in ns (barrier excluded)."""
    stage: int
    ns: float


@dataclass
class AnnBaseline(Result):
    """The source ANN's MACs priced on the same table, J per inference (None: the target has no such price)."""
    mac_ann: float                      # MACs per inference of the source ANN
    target_j: float | None              # at the target's own MAC price
    target_label: str
    int8_j: float | None                # at the int8 MAC price of [ann_int8]
    int8_with_memory_j: float | None    # int8 MACs plus one 8-bit weight read per MAC
    int8_source: str
    target_with_memory_j: float | None = optional()   # the target's MAC price plus weight-memory reads


@dataclass
class Traffic(Result):
    """Memory and spike traffic per inference: synaptic-memory reads (count, bits) and spike payload bits."""
    synaptic_reads: float
    synaptic_read_bits: float
    message_bits: float
    note: str


@dataclass
class LayerEnergy(Result):
    """One synaptic layer's arithmetic energy per inference in J (SNN, and the ANN on the same table)."""
    name: str
    snn_j: float = 0.0                  # synaptic ops and MACs of this layer only
    ann_target_j: float | None = None   # the ANN layer at the target's MAC price
    ann_int8_j: float | None = None     # the ANN layer at the int8 MAC price
    synops: float | None = optional()   # synaptic ops per inference under the target's convention
    synaptic_reads: float | None = optional()   # stored-weight reads per inference (weight layers only)


@dataclass
class Latency:
    """Latency per inference on a timed target (seconds); every figure None where the target is not timed."""
    latency_s: float | None = None      # one inference: the sum of its stages and barriers
    step_s: float | None = None         # one step of a pipelined stream: the slowest stage plus a barrier
    throughput_per_s: float | None = None   # inferences per second when streaming
    stages: list[LatencyStage] = field(default_factory=list)
    timed: bool = False
    untimed: list[str] = field(default_factory=list)    # what is not timed, in words
    proxy_times: list[str] = field(default_factory=list)    # time figures that are another chip's (proxy)


@dataclass
class Estimate(Result):
    """Energy (J) and latency (s) per inference of one network on one target, with every term and baseline."""
    target: str
    convention: str                     # the spike convention synaptic ops are counted under
    cores: int
    chips: int
    energy_j: float                     # total: priced dynamic terms plus static energy
    energy_dynamic_j: float
    energy_static_j: float | None       # chips × static power × single-inference latency
    energy_streaming_j: float | None    # per inference of a pipelined stream (static at the step time)
    energy_without_memory_j: float
    energy_terms: list[EnergyTerm]
    priced: list[str]                   # the terms in the total
    unpriced: list[str]                 # the terms with a count but no price (left out of the total)
    proxy_figures: list[str]            # prices and times taken from another chip
    figure_caveats: list[str]           # every figure of the target file with an evidence note
    latency_s: float | None
    step_s: float | None
    throughput_per_s: float | None
    stages: list[LatencyStage]
    timed: bool
    untimed: list[str]
    ann: AnnBaseline
    snn_over_int8_ann: float | None     # SNN energy / the int8 ANN's (below 1: the SNN wins)
    snn_over_int8_ann_baseline: str | None  # which AnnBaseline field that ratio divides by
    traffic: Traffic
    pipeline_steps: int                 # timesteps from a sample entering to its output
    layers: list[LayerEnergy]
    layers_note: str
    included: list[str] | None = optional()    # terms an all-in price already covers (scope = "all_in" only)
    bands: dict[str, dict] | None = optional()  # "energy"/"latency": measured ÷ predicted over back-tests
    avg_pool: dict | None = optional()  # graded targets: average pooling folded vs pooling layers (_avg_pool_forms)


def _term(name: str, count: float, target: Target, section: str, key: str, what: str) -> EnergyTerm:
    fig = target.figure(section, key)
    priced = fig is not None
    return EnergyTerm(term=name, count=count, what=what, price=f"{section}.{key}",
                      pj_each=fig.value if fig is not None else None,
                      joules=count * fig.value * PJ if fig is not None else None,
                      priced=priced, source=fig.source if fig is not None else "",
                      evidence=fig.evidence if fig is not None else "")


def _synops(c, conv: str, mapping: Mapping) -> float:
    """A weight layer's synaptic ops; where the mapping places the pooling it reads as a layer, one event per
    non-zero window sum per fan-out instead of the pooled spikes' fan-outs."""
    return c.ac_event_layer if mapping.avg_pool == "layer" and c.ac_event_layer else c.synops(conv)


def _fired(p, stats: dict, target: Target, steps: int = 1) -> float:
    """Compartment updates of a placed layer that fire per inference (graded events or binary channel spikes;
    a pooling layer's non-zero window sums), over the network's ``steps`` timesteps."""
    if p.op == POOLING_LAYER:
        return min(stats[p.name].pool_active, p.compartments * steps)
    if p.op == RELAY:                   # a relay passes on every event of the site (or max pooling) it reads
        return min(_relayed(stats[p.reads]), p.compartments * steps)
    sites = [stats[s] for s in p.sites]
    fired = sum(s.channel_spikes if target.spikes == "binary" else s.active for s in sites)
    return min(fired, p.compartments * steps)


def _steps(counts) -> int:
    """Timesteps per inference: 1 for SFN, T for the multi-timestep baselines (every compartment updates T times)."""
    return max((c.timesteps for c in counts.layers if c.op in NEURON_OPS), default=1)


def _arithmetic_terms(counts, target: Target, weights, products, per_layer, wbits: int) -> list[EnergyTerm]:
    """The SNN's synaptic ops as additions and its analog-input layers as MACs (the paper's model)."""
    conv = target.convention
    syn = sum(c.synops(conv) for c in weights + products)
    reads = sum(c.ac_event + c.mac for c in weights) * wbits
    terms = [_term("synaptic ops", syn, target, "energy_pj", "ac", f"additions, {conv} convention"),
             _term("MACs", counts.mac_snn, target, "energy_pj", "mac", "layers with analog (non-spike) input"),
             _term("weight memory", reads, target, "energy_pj", "memory_bit",
                   f"bits read: one {wbits}-bit weight per non-zero input per fan-out, and per MAC")]
    e_ac, e_mac = target.get("energy_pj", "ac") or 0.0, target.get("energy_pj", "mac") or 0.0
    for c in weights + products:
        row = per_layer[c.name]
        row.snn_j = (c.synops(conv) * e_ac + c.mac * e_mac) * PJ
        row.ann_target_j = c.mac_ann * e_mac * PJ
    return terms


def _ann_terms(counts, target: Target, weights, products, per_layer, wbits: int) -> list[EnergyTerm]:
    """A dense engine (``runs = "ann"``): the source ANN's MACs, products included, and its weight reads."""
    e_mac = target.get("energy_pj", "mac") or 0.0
    for c in weights + products:
        per_layer[c.name].snn_j = per_layer[c.name].ann_target_j = c.mac_ann * e_mac * PJ
    return [_term("ANN MACs", counts.mac_ann, target, "energy_pj", "mac", "the source ANN, run densely"),
            _term("weight memory", sum(c.mac_ann for c in weights) * wbits, target, "energy_pj", "memory_bit",
                  f"bits read: one {wbits}-bit weight per MAC")]


def _avg_pool_forms(counts, target: Target, weights) -> dict | None:
    """Average pooling of spikes on a graded target, the part of the bill that differs between its two forms,
    priced with the target's own figures: folded into the next layer's weights (each pre-pool spike carries the
    pooled position's whole fan-out) or a pooling layer of graded neurons (one event per spike into it, then the
    fan-out per non-zero window sum, plus its neurons' updates and messages). None where no pooling could be a
    layer or the target's spikes are not graded events. :func:`plan_target` compares the whole estimates."""
    pools = [c for c in counts.layers if c.pool_neurons]
    if not pools or target.spikes != "graded" or target.convention != "event":
        return None
    readers = [c for c in weights if c.ac_event_layer]
    e_syn = (target.get("energy_pj", "synop") or 0.0) + (target.get("energy_pj", "payload_multiply") or 0.0)
    e_fire = (target.get("energy_pj", "neuron_update") or 0.0) + (target.get("energy_pj", "spike") or 0.0)
    e_silent = target.get("energy_pj", "neuron_update_inactive") or 0.0
    folded = sum(c.ac_event for c in readers)
    layer = sum(c.ac_event_layer for c in readers) + sum(c.pool_events for c in pools)
    active, neurons = sum(c.pool_active for c in pools), sum(c.pool_neurons for c in pools)
    folded_j = folded * e_syn * PJ
    layer_j = (layer * e_syn + active * e_fire + (neurons - active) * e_silent) * PJ
    return {"poolings": [c.name for c in pools], "readers": [c.name for c in readers],
            "folded": {"synops": folded, "energy_j": folded_j},
            "layer": {"synops": layer, "neurons": neurons, "active": active, "energy_j": layer_j},
            "note": "energy_j: the part that differs, the synops of the layers reading the poolings (and of the "
                    "pooling layers) at synop + payload price, plus the pooling layers' neuron updates and "
                    "messages; total_j, latency_s, cores: the whole estimate in each form (static energy, the "
                    "pooling layers' pipeline step, cores and payloads included)"}


def _spiking_terms(counts, target: Target, mapping: Mapping, stats: dict, weights, per_layer,
                   pools: dict | None = None) -> list[EnergyTerm]:
    """Synaptic ops, neuron updates and spike messages of the placed layers (pooling layers included where the
    mapping places them: ``pools``' layer synops instead of the folded ones), and the analog input layer."""
    conv = target.convention
    chosen = pools if pools is not None and mapping.avg_pool == "layer" else None
    syn = sum(c.synops(conv) for c in weights)
    if chosen is not None:
        syn += chosen["layer"]["synops"] - chosen["folded"]["synops"]
    syn += sum(_RESIDUAL_SYNOPS[p.op](stats[p.reads]) for p in mapping.layers if p.op in _RESIDUAL_SYNOPS)
    terms = [_term("synaptic ops", syn, target, "energy_pj", "synop",
                   f"weight layers with spike input, {conv} convention")]
    if target.spikes == "graded":
        terms.append(_term("graded payload multiplies", syn, target, "energy_pj", "payload_multiply",
                           "one per graded synaptic op"))
    active = inactive = 0.0
    steps = _steps(counts)
    for p in mapping.layers:
        fired = _fired(p, stats, target, steps)
        active += fired
        inactive += p.compartments * steps - fired
    terms += [_term("neuron updates, active", active, target, "energy_pj", "neuron_update",
                    "compartments that fire (graded events, or binary channel spikes)"),
              _term("neuron updates, silent", inactive, target, "energy_pj", "neuron_update_inactive",
                    "compartments that do not fire (integrators included)"),
              _term("spike messages", active, target, "energy_pj", "spike",
                    "graded events" if target.spikes == "graded" else "binary channel spikes"),
              EnergyTerm("analog input layer MACs", counts.mac_snn,
                         what="first layer fed by the analog input: encoded off the neuro cores")]
    e_syn = target.get("energy_pj", "synop") or 0.0
    for c in weights:
        per_layer[c.name].snn_j = _synops(c, conv, mapping) * e_syn * PJ
    return terms


def _mark_included(terms: list[EnergyTerm], target: Target) -> None:
    """On an all-in target the synop (MAC) price already covers updates, messages, memory and static power."""
    if not target.all_in:
        return
    price = "energy_pj.mac" if target.spikes == "none" else "energy_pj.synop"
    for t in terms:
        if not t.priced and t.price and t.term not in ("host operations",):
            t.included_in = price


def estimate(graph, counts, target: Target, mapping: Mapping) -> Estimate:
    """Energy terms, totals, per-layer energy, latency and ANN baselines for one target."""
    stats = {c.name: c for c in counts.layers}
    weights = [c for c in counts.layers if c.kind == "weight"]
    products = [c for c in counts.layers if c.kind == "product"]
    conv = target.convention
    wbits = int(target.get("precision", "weight_bits") or 8)
    host_ops = counts.host_ops
    per_layer = {c.name: LayerEnergy(c.name) for c in weights + products}
    pools = None

    if target.runs == "ann":
        terms = _ann_terms(counts, target, weights, products, per_layer, wbits)
    elif target.spikes == "none":
        terms = _arithmetic_terms(counts, target, weights, products, per_layer, wbits)
    else:
        pools = _avg_pool_forms(counts, target, weights)
        if pools is not None:
            pools["priced"] = mapping.avg_pool
        terms = _spiking_terms(counts, target, mapping, stats, weights, per_layer, pools)
        host_ops += sum(c.mac_ann for c in products) - sum(stats[a].host_ops for a in _in_neurons(mapping))
    terms.append(_term("host operations", host_ops, target, "energy_pj", "host_op",
                       "LayerNorm, softmax, GELU, residual arithmetic" +
                       (", attention products" if target.spikes != "none" and products else "")))
    e_int8, e_int8_mem = target.get("ann_int8", "mac"), target.get("ann_int8", "memory_bit")
    for c in weights + products:
        if e_int8 is not None:
            per_layer[c.name].ann_int8_j = c.mac_ann * e_int8 * PJ

    # traffic: one synaptic-memory read per synaptic op (of weight_bits), and spike payload bits
    message_bits = 0.0
    on_core = {name for p in mapping.layers for name in p.sites}      # the sites whose messages are priced
    for c in counts.layers:
        if c.name in on_core and target.spikes != "none":
            table = graph[c.name].params["table"]
            if target.spikes == "graded":       # one message per event, payload = signed level
                message_bits += c.active * (int(table.max()).bit_length() + (1 if c.dual else 0))
            else:                               # one binary spike per active channel
                message_bits += c.channel_spikes
    for p in mapping.layers:                    # pooling layers (a window sum) and relays (a level) per event
        if p.op in (POOLING_LAYER, RELAY):
            message_bits += _fired(p, stats, target) * p.payload_bits
    for c in weights + products:
        per_layer[c.name].synops = _synops(c, conv, mapping) if c.kind == "weight" else c.synops(conv)
    for c in weights:                           # products have no stored weights to read
        # a graded or multi-spike event reads its weight once; a binary channel reads its own weight
        per_layer[c.name].synaptic_reads = (
            (c.ac_channel if target.spikes == "binary" else _synops(c, "event", mapping)) if c.input == "spikes"
            else c.mac)
    all_reads = sum(r.synaptic_reads if r.synaptic_reads is not None else 0.0 for r in per_layer.values())
    traffic = Traffic(synaptic_reads=all_reads, synaptic_read_bits=all_reads * wbits, message_bits=message_bits,
                      note="reads: one stored weight per non-zero input per fan-out (per active channel on binary "
                           "targets) or per MAC of a weight layer; message bits: payloads of the spikes sent by "
                           "on-core neurons only (graded: the signed level's bits per event, a pooling layer's "
                           "largest window sum's bits; binary: one per channel spike), no routing headers")
    lat = _latency(counts, target, mapping)
    dynamic = sum(t.joules or 0.0 for t in terms if t.priced)
    memory = sum(t.joules or 0.0 for t in terms if t.priced and t.term == "weight memory")
    static_w = target.get("chip", "static_w")
    chips = mapping.chips or 1
    static = static_w * chips * lat.latency_s if static_w and lat.latency_s and not target.all_in else None
    streaming_static = static_w * chips * (lat.step_s or 0.0) if static is not None and static_w else None
    if target.spikes != "none" or target.get("time_ns", "mac") is not None:
        fig = target.figure("chip", "static_w")
        terms.append(EnergyTerm("static power", lat.latency_s,
                                unit="seconds",
                                what=f"{chips} chip(s) × static power × single-inference latency",
                                price="chip.static_w", joules=static, priced=static is not None,
                                source=fig.source if fig else "", evidence=fig.evidence if fig else ""))
    _mark_included(terms, target)
    energy = dynamic + (static or 0.0)
    ann = _ann(counts.mac_ann, target, wbits, e_int8, e_int8_mem)
    compare_to = ann.int8_with_memory_j if memory or target.spikes != "none" or target.all_in else ann.int8_j
    return Estimate(
        target=target.name, convention=conv, cores=mapping.cores, chips=mapping.chips,
        energy_j=energy, energy_dynamic_j=dynamic, energy_static_j=static,
        energy_streaming_j=dynamic + streaming_static if streaming_static is not None else None,
        energy_without_memory_j=energy - memory, energy_terms=terms,
        priced=[t.term for t in terms if t.priced],
        unpriced=[t.term for t in terms if not t.priced and t.count and not t.included_in],
        proxy_figures=sorted({t.price for t in terms if t.priced and t.evidence == "proxy" and t.price}
                             | (set(lat.proxy_times) if lat.timed else set())),
        figure_caveats=[f"{s}.{k}: {f.evidence} ({f.source})" for s, keys in target.figures.items()
                        for k, f in keys.items() if f.evidence],
        latency_s=lat.latency_s, step_s=lat.step_s, throughput_per_s=lat.throughput_per_s, stages=lat.stages,
        timed=lat.timed, untimed=lat.untimed, ann=ann,
        snn_over_int8_ann=energy / compare_to if compare_to and target.runs == "snn" else None,
        snn_over_int8_ann_baseline=("int8_with_memory_j" if compare_to == ann.int8_with_memory_j
                                    else "int8_j") if compare_to and target.runs == "snn" else None,
        traffic=traffic, pipeline_steps=len(set(mapping.stages.values()) - {0} if mapping.stages
                                            else {c.stage for c in counts.layers if c.stage}),
        layers=list(per_layer.values()),
        layers_note="snn_j: synaptic ops and MACs of each layer only (neuron updates, messages, memory and "
                    "static power are network totals)",
        included=[t.term for t in terms if t.included_in] or None,
        bands={k: {**vars(b), "text": str(b)} for k, b in target.bands.items()} or None, avg_pool=pools)


def plan_target(graph, counts, target: Target) -> tuple[Mapping, Estimate]:
    """Mapping and estimate on one target. Where average pooling could run as pooling layers (graded event
    targets), both forms are mapped and priced whole (static energy over the other pipeline, cores, payloads),
    and the cheaper is kept unless a pooling layer breaks a limit (a window sum's payload) or the layer form
    breaks one the folded form keeps (``avg_pool["layer"]["breaks"]``); ``avg_pool`` says both."""
    folded = map_network(graph, counts, target)
    e = estimate(graph, counts, target, folded)
    if e.avg_pool is None:
        return folded, e
    layered = map_network(graph, counts, target, avg_pool="layer")
    e2 = estimate(graph, counts, target, layered)
    old_rules = {v.rule for v in folded.violations}
    breaks = sorted({f"{v.rule} ({v.value:,.0f} > {v.limit:,.0f})" for v in layered.violations
                     if v.layer in e.avg_pool["poolings"] or v.rule not in old_rules})
    for form, est, m in (("folded", e, folded), ("layer", e2, layered)):
        e.avg_pool[form].update(total_j=est.energy_j, latency_s=est.latency_s, cores=m.cores, fits=m.fits)
    e.avg_pool["layer"]["breaks"] = breaks
    keep = e2.energy_j < e.energy_j and not breaks
    e.avg_pool["chosen"] = "layer" if keep else "folded"
    if not keep:
        return folded, e
    e2.avg_pool = {**e.avg_pool, "priced": "layer"}
    return layered, e2


def _ann(mac_ann: float, target: Target, wbits: int, e_int8: float | None, e_int8_mem: float | None) -> AnnBaseline:
    """The source ANN's MACs at the target's MAC price and at int8, with and without weight memory."""
    e_mac = target.get("energy_pj", "mac")
    int8_fig = target.figure("ann_int8", "mac")
    ann = AnnBaseline(mac_ann=mac_ann, target_j=mac_ann * e_mac * PJ if e_mac else None,
                      target_label=f"ANN at {target.name}'s MAC price ({e_mac:g} pJ)" if e_mac else "",
                      int8_j=mac_ann * e_int8 * PJ if e_int8 is not None else None,
                      int8_with_memory_j=(mac_ann * e_int8 + mac_ann * 8 * e_int8_mem) * PJ
                      if e_int8 is not None and e_int8_mem is not None else None,
                      int8_source=int8_fig.source if e_int8 is not None and int8_fig is not None else "")
    mem = target.get("energy_pj", "memory_bit")
    if ann.target_j is not None and mem:
        ann.target_with_memory_j = ann.target_j + mac_ann * wbits * mem * PJ
    return ann


def _arithmetic_latency(counts, target: Target) -> Latency:
    """A dense or arithmetic engine does its operations one after another at the sustained rate: no pipeline."""
    t_mac = target.get("time_ns", "mac")
    if t_mac is None:
        return Latency(untimed=["the whole network: the target gives no time per MAC"])
    t_ac = target.get("time_ns", "ac")
    if target.runs == "ann":
        ns = counts.mac_ann * t_mac
    else:
        ns = counts.mac_snn * t_mac + sum(c.synops(target.convention) for c in counts.layers
                                          if c.kind in ("weight", "product")) * (t_mac if t_ac is None else t_ac)
    host = target.get("time_ns", "host_op")
    untimed = ["host operations"] if counts.host_ops and host is None else []
    ns += counts.host_ops * (host or 0.0)
    return Latency(latency_s=ns * 1e-9, step_s=ns * 1e-9, throughput_per_s=1e9 / ns if ns else None,
                   stages=[], timed=True, untimed=untimed, proxy_times=_proxy_times(target))


def _proxy_times(target: Target) -> list[str]:
    return [f"time_ns.{k}" for k, fig in target.figures.get("time_ns", {}).items() if fig.evidence == "proxy"]


def _in_neurons(mapping: Mapping) -> set[str]:
    """Host-kind nodes a graded chip does in its synapses and neurons: residual sums on cores, ReLU6 clips."""
    return set(mapping.residual_sums) | set(mapping.clips)


def _placed_synops(p, stats: dict, conv: str, mapping: Mapping) -> float:
    """Synaptic ops of one placed layer: a pooling layer's events in; a weight layer's (:func:`_synops`)."""
    if p.op in _RESIDUAL_SYNOPS:
        return _RESIDUAL_SYNOPS[p.op](stats[p.reads])
    c = stats[p.name]
    return c.pool_events if p.op == POOLING_LAYER else _synops(c, conv, mapping)


def _relayed(c) -> float:
    """Events a relay passes on: a site's, or those of max-pooled levels (its residual sum's ``skip_events``)."""
    return c.active if c.op in NEURON_OPS else c.skip_events


# a residual sum on cores: its shortcut synapses take one op per spike of a site operand, a relay one per event
_RESIDUAL_SYNOPS = {SHORTCUT: lambda c: c.skip_events, RELAY: _relayed}


def _latency(counts, target: Target, mapping: Mapping) -> Latency:
    if target.spikes == "none":
        return _arithmetic_latency(counts, target)
    t = {k: target.get("time_ns", k)
         for k in ("synop", "neuron_update", "neuron_update_inactive", "spike", "barrier", "timestep")}
    if not target.has_cores or (t["synop"] is None and t["timestep"] is None):
        return Latency(untimed=["the whole network: the target gives no core model, no time per synaptic op "
                                "and no timestep"])
    stats = {c.name: c for c in counts.layers}
    conv = target.convention
    steps = _steps(counts)
    stage_of = mapping.stages or {c.name: c.stage for c in counts.layers}
    stage_time: dict[int, float] = {}          # per timestep: a T-step network spreads its work over T steps
    for p in mapping.layers:
        fired = _fired(p, stats, target, steps)
        silent = t["neuron_update_inactive"] if t["neuron_update_inactive"] is not None else t["neuron_update"]
        upd = fired * (t["neuron_update"] or 0.0) + (p.compartments * steps - fired) * (silent or 0.0)
        ns = (_placed_synops(p, stats, conv, mapping) * (t["synop"] or 0.0) + upd + fired * (t["spike"] or 0.0)) \
            / (p.cores * steps)
        stage = p.stage if mapping.stages else stage_of[p.name]
        stage_time[stage] = max(stage_time.get(stage, 0.0), ns)
    host = target.get("time_ns", "host_op")
    if host is not None:                       # host work runs serially on one host core
        for c in counts.layers:
            work = c.host_ops + (c.mac_ann if c.kind == "product" else 0.0)   # products run on the host too
            if work and c.name not in _in_neurons(mapping):
                stage = stage_of[c.name]
                stage_time[stage] = max(stage_time.get(stage, 0.0), work * host)
    if t["timestep"] is not None:              # a clocked chip: every stage lasts at least one tick
        stage_time = {k: max(v, t["timestep"]) for k, v in stage_time.items()}
    barrier = t["barrier"] or 0.0
    step = max(stage_time.values(), default=0.0) + barrier
    # the first timestep's input crosses every stage; the remaining T - 1 follow one step apart
    return Latency(latency_s=(sum(v + barrier for v in stage_time.values()) + (steps - 1) * step) * 1e-9,
                   step_s=step * 1e-9, throughput_per_s=1e9 / (step * steps) if step else None,
                   stages=[LatencyStage(s, v) for s, v in sorted(stage_time.items())], timed=True,
                   untimed=["host operations"] if counts.host_ops and host is None else [],
                   proxy_times=_proxy_times(target))
