"""Place a converted network's layers onto a target's cores and check every limit at once.

The model (an estimate for planning, not a place-and-route):
- Each weight layer (conv2d, linear) is a neuron population: one compartment per output unit,
  which integrates its synaptic input. When its output feeds an SFN site on a binary-spike
  target, the site is lowered to N threshold channels per polarity, each one more compartment
  (Loihi-style multi-compartment neuron: the channels share the integrating compartment's
  synapses). Sites fed by host operations (LayerNorm, softmax) are encoded on the host.
- Stored synapses: the layer's weights when the target shares weights, else one per
  connection (each input→output pair, padding excluded). Synaptic memory = synapses × weight bits.
  On a binary target each threshold channel of the input site is a separate axon carrying its
  own weight (the level increment folded in), so synapses, fan-in and axons scale by the
  input site's channel count.
- Layers are spread evenly over the fewest cores that satisfy neurons per core, synaptic memory
  per core and input axons per core (a conv core holds a spatial tile with all its channels and
  needs the tile's receptive field; a linear core needs every input of the tokens it holds).
  The constraint that set the core count is the layer's binding constraint.
- Core-to-core fan-out of a layer = cores of the layers its spikes feed (an upper bound).
- ``avg_pool="layer"`` (graded targets): each average pooling that Lava can build as a pooling layer
  (sfn_deploy/pooling.py) is placed as one: per polarity a depthwise window sum of ones into graded sum
  neurons (one compartment per pooled element), one more pipeline step; its payload is the largest window
  sum, which needs more bits than a level.
- Graded targets: a residual sum of conv maps read by sites (sfn_deploy/residual.py) runs on cores, as the
  Lava export builds it: both operands' synapses drive the sites' neurons (placed once, with the first
  operand layer), a site's spikes reach them through a 1×1 shortcut synapse (one synaptic op per spike, no
  neurons of its own, stored on the neurons' cores), and the operand with fewer synaptic layers reads its
  spikes through relays, one graded neuron per element, polarity and pipeline step.
- Graded targets: a clip to [0, c] (ReLU6) read by positive-only sites (sfn_deploy/clips.py) runs in those
  sites' neurons (thresholds up to c), not on the host.
- Products of two spike tensors (attention) have no static synapses and, with LayerNorm,
  softmax, GELU and residual arithmetic, run on the host: listed as host work, not violations.
A limit the target file does not give is not checked, and the mapping says so.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from sfn_deploy.clips import neuron_clips
from sfn_deploy.ir import NEURON_OPS, Graph, Node
from sfn_deploy.pooling import SumKernel, pooling_layers
from sfn_deploy.residual import core_sums

from .schema import Target

_THROUGH = {"reshape", "permute", "transpose", "flatten", "unsqueeze", "squeeze", "select", "slice", "expand",
            "cat", "max_pool2d", "avg_pool2d", "adaptive_avg_pool2d", "mean"}
POOLING_LAYER = "pooling layer"   # the op of a placed pooling layer (``avg_pool="layer"``)
SHORTCUT = "shortcut synapses"    # a residual sum's 1×1 synapses from a site's spikes (graded targets)
RELAY = "relay"                   # one step's relay neurons of a residual sum's earlier operand
FIXED_POINT_WEIGHT_BITS = 8      # the Lava export's weights (exporters/lava): what fidelity was measured at
LIMITS = {"neurons": "neurons per core", "synapse_bits": "synaptic memory per core (bits)",
          "fan_in": "input axons per core", "fan_out": "destination cores per core"}


@dataclass
class Violation:
    layer: str
    rule: str
    limit: float
    value: float
    fix: str

    def to_dict(self) -> dict:
        return dict(vars(self))

    def __str__(self) -> str:
        return f"{self.layer}: {self.rule}: {_n(self.value)} > limit {_n(self.limit)}; fix: {self.fix}"


@dataclass
class Placement:
    name: str
    op: str
    source: str
    units: int
    compartments: int
    synapses: int
    synapse_bits: int
    fan_in: int
    axons_per_core: int
    cores: int
    binding: str
    output: str                   # "spikes" (feeds an SFN site), "host" or "network output"
    channels: int = 0             # threshold channels per unit (binary targets)
    dest_cores: int = 0
    input_channels: int = 1       # binary targets: axons per input element (the input site's channels)
    sites: list = field(default_factory=list)   # the SFN sites this layer's output feeds
    stage: int = 0                # pipeline step (a pooling layer adds one)
    payload_bits: int = 0         # pooling layers and relays: bits of the largest value their events carry
    reads: str = ""               # shortcut synapses: the residual sum; relays: the site whose spikes they pass on

    def to_dict(self) -> dict:
        return dict(vars(self))


@dataclass
class Mapping:
    target: str
    layers: list[Placement] = field(default_factory=list)
    violations: list[Violation] = field(default_factory=list)
    host_work: list[dict] = field(default_factory=list)
    unchecked: list[str] = field(default_factory=list)
    cores: int = 0
    chips: int = 0
    chip_binding: str = ""
    compartments: int = 0
    synapses: int = 0
    avg_pool: str = "folded"      # how average pooling of spikes is placed: folded into weights, or "layer"
    residual_sums: list[str] = field(default_factory=list)   # graded targets: residual sums placed on cores
    clips: list[str] = field(default_factory=list)   # graded targets: ReLU6 clips run in the neurons they feed
    stages: dict[str, int] = field(default_factory=dict)   # pipeline step of every graph node in this form

    @property
    def fits(self) -> bool:
        return not self.violations

    def to_dict(self) -> dict:
        return {"target": self.target, "fits": self.fits, "cores": self.cores, "chips": self.chips,
                "chip_binding": self.chip_binding, "compartments": self.compartments, "synapses": self.synapses,
                "avg_pool": self.avg_pool, "residual_sums": self.residual_sums, "clips": self.clips,
                "unchecked": self.unchecked, "violations": [v.to_dict() for v in self.violations],
                "host_work": self.host_work, "layers": [p.to_dict() for p in self.layers]}


def _n(v: float) -> str:
    return f"{v:,.0f}" if float(v).is_integer() else f"{v:,.3g}"


def _reach(graph: Graph, users: dict, name: str, stop, through=frozenset()) -> list[Node]:
    """Nodes satisfying ``stop`` reached from ``name`` through layout and pooling ops (and the nodes named in
    ``through``: residual sums on cores)."""
    found, todo, seen = [], [name], set()
    while todo:
        for u in users.get(todo.pop(), []):
            if u.name in seen:
                continue
            seen.add(u.name)
            if stop(u):
                found.append(u)
            elif u.op in _THROUGH or u.name in through:
                todo.append(u.name)
    return found


def source_site(graph: Graph, name: str) -> Node | None:
    """The SFN site whose spikes reach ``name`` through layout and pooling ops, if any."""
    n = graph[name]
    while n.inputs and (n.op in _THROUGH or (n.op in ("mul", "div") and len(n.inputs) == 1)):
        n = graph[n.inputs[0]]      # layout, pooling and scaling by a constant keep spikes spikes
    return n if n.op in NEURON_OPS else None


def _axons(node: Node, graph: Graph, per_core: int, units: int) -> int:
    """Distinct inputs the neurons on one core need."""
    x = graph[node.inputs[0]].shape
    w = node.params["weight"]
    if node.op == "linear":
        out_f, in_f = w.shape
        tokens = max(units // out_f, 1)
        return min(tokens, math.ceil(per_core / out_f)) * in_f
    a = node.attrs
    return _conv_axons(x[-2:], node.shape[-2:], tuple(w.shape), a["stride"], a["dilation"], a["groups"], per_core)


def _conv_axons(x_hw, out_hw, w_shape: tuple, stride, dilation, groups: int, per_core: int) -> int:
    """Distinct inputs of one core holding a spatial tile of a convolution's output with all its channels."""
    c_out, c_in_g, kh, kw = w_shape
    h_out, w_out = out_hw
    positions = max(math.ceil(per_core / c_out), 1)
    side = math.ceil(math.sqrt(positions))
    th, tw = min(side, h_out), min(math.ceil(positions / min(side, h_out)), w_out)
    ih = min((th - 1) * stride[0] + dilation[0] * (kh - 1) + 1, x_hw[0])
    iw = min((tw - 1) * stride[1] + dilation[1] * (kw - 1) + 1, x_hw[1])
    channels_here = min(per_core, c_out)
    groups_here = min(groups, math.ceil(channels_here * groups / c_out))
    return ih * iw * c_in_g * groups_here


def _host_work(graph: Graph, node: Node, c, spiking: bool, stage: int, in_neurons=frozenset()) -> list[dict]:
    """What of ``node`` (with per-layer statistics ``c``, at pipeline step ``stage``) runs on the host rather than
    on cores (a residual sum or clip the chip does, ``in_neurons``, and the sites it feeds: nothing)."""
    work: list[dict] = []
    if node.name in in_neurons or (node.op in NEURON_OPS and node.inputs and node.inputs[0] in in_neurons):
        return work
    if node.kind == "host" and c.host_ops:
        work.append({"layer": node.name, "op": node.op, "ops": c.host_ops, "unit": "elements", "stage": stage,
                     "why": "not a synaptic operation: runs on the host (embedded or attached CPU)"})
    elif node.op == "matmul" and spiking:
        work.append({"layer": node.name, "op": "matmul", "ops": c.mac_ann, "unit": "MACs", "stage": stage,
                     "why": "product of two activations: no static synapses to store on a core"})
    elif node.op in NEURON_OPS and graph[node.inputs[0]].kind == "host" and spiking:
        work.append({"layer": node.name, "op": node.op, "ops": c.neurons, "unit": "neurons", "stage": stage,
                     "why": f"SFN fed by host op {graph[node.inputs[0]].op}: spikes encoded on the host"})
    if node.kind == "weight" and c.input == "analog" and spiking:
        work.append({"layer": node.name, "op": "input encoding", "ops": c.mac, "unit": "MACs", "stage": stage,
                     "why": "fed by the analog network input: its neurons are placed on cores, but its "
                            "MACs are not synaptic ops (the input must be encoded as spikes first)"})
    return work


def _cores(units: int, need: dict, fan_in_limit, axons: Callable[[int], int]) -> tuple[int, str]:
    """Cores for one layer and the limit that sets their number: the most that neurons or synaptic memory need,
    raised (binary search) until the distinct inputs of one core's neurons (``axons(per_core)``) fit the core's
    fan-in."""
    binding = max(need, key=lambda k: need[k])
    cores = max(need.values())
    if not fan_in_limit:
        return cores, binding

    def fits(k: int) -> bool:
        return axons(math.ceil(units / k)) <= fan_in_limit

    lo, hi = cores, max(units, cores)
    if fits(lo):
        return cores, binding
    if not fits(hi):
        return hi, "fan_in"
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if fits(mid) else (mid + 1, hi)
    return lo, "fan_in"


def _violations(p: Placement, sites: list[Node], stats: dict, core: dict, wbits: int, target: Target) -> list:
    """The per-layer limits of one placed layer that the target's cores cannot meet."""
    out = []
    fan_in_limit = core["fan_in"]
    if fan_in_limit and p.fan_in > fan_in_limit:
        k = math.ceil(p.fan_in / fan_in_limit)
        out.append(Violation(p.name, "fan-in per neuron", fan_in_limit, p.fan_in,
                             f"split the input into {k} partial sums of ≤ {fan_in_limit:,} inputs "
                             "accumulated by a second compartment"))
    elif fan_in_limit and p.axons_per_core > fan_in_limit:
        out.append(Violation(p.name, LIMITS["fan_in"], fan_in_limit, p.axons_per_core,
                             "split the layer by output channel or reduce its receptive field"))
    if core["synapse_bits"] and p.fan_in * wbits > core["synapse_bits"]:
        out.append(Violation(p.name, "synaptic memory of one neuron (bits)", core["synapse_bits"],
                             p.fan_in * wbits, "lower the weight precision or split the input"))
    if core["neurons"] and 1 + p.channels > core["neurons"]:
        out.append(Violation(p.name, "compartments of one neuron", core["neurons"], 1 + p.channels,
                             "lower M (fewer threshold channels)"))
    if target.spikes == "graded" and sites:
        top = max(int(s.params["table"].max()) for s in sites)     # the worst case, not just the data's
        need_bits = max(top, 1).bit_length() + (1 if any(stats[s.name].dual for s in sites) else 0)
        payload = target.get("precision", "payload_bits")
        if payload and need_bits > payload:
            out.append(Violation(p.name, "graded spike payload (bits)", payload, need_bits,
                                 "lower M or use the linear fire function (levels up to 2M)"))
    return out


def _place(graph: Graph, users: dict, node: Node, stats: dict, core: dict, wbits: int,
           target: Target, sums=frozenset(), shares: bool = False) -> tuple[Placement, list[Node]]:
    """Place one weight layer; returns the placement and the SFN sites its output feeds (through the residual
    ``sums`` on cores too; ``shares``: another operand of such a sum places those neurons)."""
    c = stats[node.name]
    binary = target.spikes == "binary"
    sites = _reach(graph, users, node.name, lambda u: u.op in NEURON_OPS, sums)
    hosts = _reach(graph, users, node.name,
                   lambda u: u.op not in NEURON_OPS and u.op not in _THROUGH and u.name not in sums, sums)
    output = "spikes" if sites and not hosts else "host" if hosts else "network output"
    channels = 0
    if binary and sites:
        channels = max(stats[s.name].levels * (2 if stats[s.name].dual else 1) for s in sites)
    # binary spikes: every threshold channel of the input site is its own axon with its own weight
    ch_in = 1
    src = source_site(graph, node.inputs[0])
    if binary and src is not None:
        ch_in = stats[src.name].levels * (2 if stats[src.name].dual else 1)
    fan_in = c.fan_in * ch_in
    units = c.neurons
    comp = 0 if shares else units * (1 + channels)
    syn = (c.weights if target.weight_sharing else c.connections) * ch_in
    bits = syn * wbits
    need = {"neurons": max(math.ceil(comp / core["neurons"]), 1) if core["neurons"] else 1,
            "synapse_bits": math.ceil(bits / core["synapse_bits"]) if core["synapse_bits"] else 1}
    cores, binding, axons = 1, "none", 0
    if target.has_cores:
        cores, binding = _cores(units, need, core["fan_in"],
                                lambda per_core: _axons(node, graph, per_core, units) * ch_in)
        axons = _axons(node, graph, math.ceil(units / cores), units) * ch_in
    if cores == 1 and binding != "fan_in":
        binding = "none (fits one core)"
    p = Placement(node.name, node.op, node.source, units, comp, syn, bits, fan_in, axons,
                  cores if target.has_cores else 0, LIMITS.get(binding, binding), output, channels, 0, ch_in,
                  [site.name for site in sites])
    return p, sites


def _place_pool(graph: Graph, node: Node, kernel: SumKernel, core: dict, wbits: int,
                target: Target) -> tuple[Placement, list[Violation]]:
    """An average pooling placed as a pooling layer (as exporters/lava builds it): per polarity of its site, a
    depthwise window sum of ones into graded sum neurons whose level is the window's integer sum."""
    site = graph[node.inputs[0]]
    ch, h, w = site.shape[1:]
    out_hw = list(node.shape[2:]) if len(node.shape) == 4 else [1, 1]
    table = site.params["table"]
    tops = [int(table.max())] + ([int(-table.min())] if site.params["bounds_neg"].numel() else [])
    area = kernel.kernel[0] * kernel.kernel[1]
    per_pol = ch * out_hw[0] * out_hw[1]
    units = per_pol * len(tops)
    syn = (ch * area if target.weight_sharing else per_pol * area) * len(tops)
    bits = syn * wbits
    need = {"neurons": math.ceil(per_pol / core["neurons"]) if core["neurons"] else 1,
            "synapse_bits": math.ceil(bits / len(tops) / core["synapse_bits"]) if core["synapse_bits"] else 1}

    def axons(per_core: int) -> int:
        return _conv_axons((h, w), out_hw, (ch, 1, *kernel.kernel), kernel.stride, [1, 1], ch, per_core)

    cores, binding, per_core_axons = 0, "none", 0
    if target.has_cores:
        cores, binding = _cores(per_pol, need, core["fan_in"], axons)
        per_core_axons = axons(math.ceil(per_pol / cores))
        cores *= len(tops)
        if cores == len(tops) and binding != "fan_in":
            binding = "none (fits one core)"
    p = Placement(node.name, POOLING_LAYER, node.source, units, units, syn, bits, area, per_core_axons, cores,
                  LIMITS.get(binding, binding), "spikes")
    out = []
    p.payload_bits = need_bits = max(max(tops) * area, 1).bit_length()    # the largest window sum, per polarity
    payload = target.get("precision", "payload_bits")
    if target.has_cores and payload and need_bits > payload:
        out.append(Violation(p.name, "graded spike payload of a window sum (bits)", payload, need_bits,
                             "keep the average pooling folded into the next weights (--avg-pool folded)"))
    if target.has_cores and core["fan_in"] and per_core_axons > core["fan_in"]:
        out.append(Violation(p.name, LIMITS["fan_in"], core["fan_in"], per_core_axons,
                             "keep the average pooling folded into the next weights (--avg-pool folded)"))
    return p, out


def _delays(graph: Graph, sums: dict, stages: dict) -> dict[str, tuple[str, int]]:
    """Each operand of a residual sum on cores that reaches it early (a conv layer, or a shortcut synapse
    keyed ``<sum>:<k>``): the site whose spikes its relays pass on, and for how many steps."""
    out = {}
    for name, spikes in sums.items():
        for k, i in enumerate(graph[name].inputs):
            if k in spikes:
                site, stage, key = spikes[k].spikes, stages[spikes[k].spikes] + 1, f"{name}:{k}"
            else:
                x = graph[graph[i].inputs[0]]      # a site, a max pooling of one, or a folded pooling of one
                site, stage, key = (x.name if x.op in NEURON_OPS or x.op == "max_pool2d" else x.inputs[0]), \
                    stages[i], i
            if stage < stages[name]:
                out[key] = (site, stages[name] - stage)
    return out


def _place_sum(graph: Graph, node: Node, spikes: dict, delayed: dict, wbits: int, target: Target,
               stages: dict) -> list[Placement]:
    """A residual sum on cores: the 1×1 shortcut synapses of its spike operands (on the cores of the neurons
    they drive) and the relays of its early operands, one placement per step."""
    out = []
    if spikes:
        pos = node.shape[2] * node.shape[3]
        syn = sum(graph[cut.spikes].shape[1] * (1 if target.weight_sharing else pos) for cut in spikes.values())
        # with no conv operand the shortcut synapses place the neurons themselves
        units = 0 if len(spikes) < len(node.inputs) else int(math.prod(node.shape[1:]))
        per_core = target.get("core", "neurons")
        cores = (math.ceil(units / per_core) if per_core else 1) if target.has_cores and units else 0
        out.append(Placement(f"{node.name}:shortcut", SHORTCUT, node.source, units, units, syn, syn * wbits, 1, 0,
                             cores, "none (on its sum's neurons' cores)" if not units else LIMITS["neurons"],
                             "spikes", sites=[u.name for u in graph.users()[node.name]] if units else [],
                             stage=stages[node.name], reads=node.name))
    for key in [f"{node.name}:{k}" for k in spikes] + [i for i in node.inputs if i not in spikes]:
        if key not in delayed:
            continue
        value, steps = delayed[key]
        site = graph[value]
        while site.op not in NEURON_OPS:        # max-pooled levels: the site they come from
            site = graph[site.inputs[0]]
        table = site.params["table"]
        polarities = 2 if site.params["bounds_neg"].numel() else 1
        n = int(math.prod(graph[value].shape[1:])) * polarities
        # what the relays pass on: the site's events; max-pooled levels: a shortcut's are the sum's skip_events,
        # a conv operand's are bounded by the site's events before the pooling
        reads = value if value == site.name else node.name if key.startswith(f"{node.name}:") else site.name
        bits = max(int(table.max()), 1).bit_length()
        per_core = target.get("core", "neurons")
        cores = (math.ceil(n / per_core) if per_core else 1) if target.has_cores else 0
        for step in range(1, steps + 1):            # at the steps after the site's, in the report's stages
            out.append(Placement(f"{key}:relay{step}", RELAY, site.source, n, n, n, n * wbits, 1, 0, cores,
                                 LIMITS["neurons"] if cores > 1 else "none (fits one core)", "spikes",
                                 stage=stages[value] + step, payload_bits=bits, reads=reads))
    return out


def _fan_out(m: Mapping, graph: Graph, users: dict, pools, limit) -> None:
    """Destination cores of each placement's events (a violation past ``limit``); a residual sum's shortcut
    synapses sit on the cores of the neurons they drive."""
    by_name = {p.name: p for p in m.layers}
    for p in m.layers:
        if p.op == SHORTCUT and not p.units:
            holder = next((by_name[i] for i in graph[p.reads].inputs if i in by_name and by_name[i].compartments),
                          None)
            p.cores = holder.cores if holder is not None else p.cores

    def receivers(u: Node) -> bool:             # where a site's or a pooling layer's events go
        return u.kind == "weight" or u.name in pools

    for p in m.layers:
        starts = [p.name] if p.name in pools else p.sites
        p.dest_cores = sum(by_name[r.name].cores for s in starts for r in _reach(graph, users, s, receivers))
        if limit and p.dest_cores > limit:
            m.violations.append(Violation(p.name, LIMITS["fan_out"], limit, p.dest_cores,
                                          "place consumer layers on fewer, fuller cores or split this layer"))


def map_network(graph: Graph, counts, target: Target, avg_pool: str = "folded") -> Mapping:
    """Map the network with the per-layer statistics of ``counts`` (an OpCounts) onto ``target``; average pooling
    of spikes folded into the next weights, or (``avg_pool="layer"``, graded targets) as pooling layers."""
    if avg_pool not in ("folded", "layer") or (avg_pool == "layer" and target.spikes != "graded"):
        raise ValueError(f"avg_pool {avg_pool!r} on a target with {target.spikes} spikes")
    m = Mapping(target.name, avg_pool=avg_pool)
    users = graph.users()
    pools = pooling_layers(graph, users) if avg_pool == "layer" else {}
    sums = core_sums(graph, pools, users) if target.spikes == "graded" else {}
    clips = neuron_clips(graph, users) if target.spikes == "graded" else {}
    m.clips = list(clips)
    m.stages = graph.stages(pools, sums | clips)
    stats = {c.name: c for c in counts.layers}
    core = {k: target.get("core", k) for k in LIMITS}
    chip = {k: target.get("chip", k) for k in ("cores", "neurons", "synapses")}
    wbits = int(target.get("precision", "weight_bits") or 8)
    if not target.has_cores:
        m.unchecked = ["no core model: this target prices arithmetic only"]
    else:
        m.unchecked = [LIMITS[k] for k, v in core.items() if v is None]
        m.unchecked += [f"{k} per chip" for k, v in chip.items() if v is None and k != "cores"]

    spiking = target.spikes != "none"        # an arithmetic target prices products and encoding as ops
    m.residual_sums = list(sums)
    delayed = _delays(graph, sums, graph.stages(pools, sums, kinds=("weight",)))   # synaptic steps, as in Lava
    shares = {o for name in sums for o in [i for i in graph[name].inputs if graph[i].op == "conv2d"][1:]}
    in_neurons = set(sums) | set(clips)        # host ops a graded chip's synapses and neurons do
    for node in graph.nodes:
        m.host_work += _host_work(graph, node, stats[node.name], spiking, m.stages[node.name], in_neurons)
        if node.name in pools:
            p, bad = _place_pool(graph, node, pools[node.name], core, wbits, target)
            p.stage = m.stages[node.name]
            m.layers.append(p)
            m.violations += bad
        if node.name in sums:
            m.layers += _place_sum(graph, node, sums[node.name], delayed, wbits, target, m.stages)
        if node.kind != "weight":
            continue
        p, sites = _place(graph, users, node, stats, core, wbits, target, in_neurons, node.name in shares)
        p.stage = m.stages[next(iter(users[node.name])).name] if node.name in delayed else m.stages[node.name]
        m.layers.append(p)
        if target.has_cores:
            m.violations += _violations(p, sites, stats, core, wbits, target)

    _fan_out(m, graph, users, pools, core["fan_out"] if target.has_cores else None)
    if target.spikes != "none" and wbits < FIXED_POINT_WEIGHT_BITS and m.layers:
        m.violations.append(Violation(
            "all weight layers", "weight precision (bits)", wbits, FIXED_POINT_WEIGHT_BITS,
            f"quantise the weights to {wbits} bit{'s' if wbits != 1 else ''} (quantisation-aware training in the "
            "chip's own toolchain); "
            f"sfn-deploy's fixed point and its measured fidelity are for {FIXED_POINT_WEIGHT_BITS}-bit weights"))
    m.cores = sum(p.cores for p in m.layers if p.op != SHORTCUT or p.units) if target.has_cores else 0
    m.compartments = sum(p.compartments for p in m.layers)
    m.synapses = sum(p.synapses for p in m.layers)
    if target.has_cores:
        per_chip = chip["cores"]
        assert per_chip, "schema.parse refuses a target with [core] limits and no chip.cores"
        chips = {"cores per chip": math.ceil(m.cores / per_chip)}
        if chip["neurons"]:
            chips["neurons per chip"] = math.ceil(m.compartments / chip["neurons"])
        if chip["synapses"]:
            chips["synapses per chip"] = math.ceil(m.synapses / chip["synapses"])
        m.chip_binding = max(chips, key=lambda k: chips[k])
        m.chips = chips[m.chip_binding]
    return m
