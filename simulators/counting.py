"""Exact operation counts of a converted network on real data (SPEC §5, §8).

One pass over the data records, per layer and per inference, every count a cost model needs;
prices are applied later (:mod:`sfn_deploy.simulators.estimate`), so one run serves every target.

Synaptic operations into a weight layer fed by spikes, under three multi-spike conventions
(an input element at level y = table[k], i.e. k thresholds crossed, with fan-out F):
- ``spike`` (the SFN paper's, eq. 43): a level-y spike is |y| additions, |y|·F ACs;
- ``event`` (NeuroBench, ECMT; also Loihi 2's graded spikes, one synaptic op per non-zero
  input per fan-out, each carrying a payload multiply): 1[y ≠ 0]·F;
- ``channel`` (binary-spike hardware, each SFN lowered to N parallel threshold channels):
  k·F, one per active channel.
For the linear fire function y = k, so ``spike`` and ``channel`` agree; for the exponential one
they do not. With analog input (the first layer) a weight layer costs the ANN's MACs.
In a product of two spike tensors A·B (attention) one operand's spikes are the events and the
other plays the (dynamic) weights: |y_A|·N ops per element of A (N columns of B), or |y_B|·M per
element of B (M rows of A); the order that is cheaper over the whole data is counted, per convention (one schedule
per layer, so the counts do not depend on the batching). Pooling of spikes before a weight layer is folded into that
layer (each spike keeps its own fan-out), so pooling adds no ops. Host operations (LayerNorm, softmax,
GELU, residual arithmetic) are counted per output element under their own names; they are
outside the paper's ratio. ``stage`` is the pipeline step at which a layer runs within one
single-timestep inference (each weight layer, product or host operation adds one, as each is a
process with one step of delay on Lava), so "per timestep" totals group by stage.
All counts are per inference (per sample); sums are accumulated in float64 and are exact.

Multi-timestep graphs (``if_neuron`` sites, :mod:`sfn_deploy.simulators.temporal`): the counter sees every
step, so spikes, synaptic ops, host ops and the MACs of weight layers with time-varying analog
input add up over the T steps; layers whose input is constant (the first layer on the image) are
computed, and counted, once; ``mac_ann`` (the ANN reference) is counted once. A product of two
spike tensors under the expectation compensation (``event.ecm``) does both incremental
products each step, A(t)·S_B and S_A·B(t): the ops of both operand orders are added.

MBE graphs (``--method mbe``, :mod:`sfn_deploy.mbe`; the interpreter passes ``event.mbe``): every MBE neuron's
binary basis spikes over its T internal steps are counted as ``spikes`` and charged one AC each (the MBE paper's
"MBE ops": a spike accumulates its intensity); the spikes of identity and GELU neurons then drive the next
weight layer (spike convention: one AC per basis spike per fan-out; event convention: one per neuron-step with
a spike); a product of two MBE-encoded operands (``attrs["mbe_product"]``) and the FP multiplies inside the
spiking softmax/LayerNorm are charged one AC per coincidence (pair of spikes of the two operands; event
convention: pair of events). Their float work (exponent split/add, sums, means, affine) is host work.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace

import torch
import torch.nn.functional as F

from sfn_deploy.ir import NEURON_OPS, Graph, Node
from sfn_deploy.neurons import NODE_CACHE, level_table, level_values, signed_table
from sfn_deploy.ops import apply
from sfn_deploy.pooling import pooling_layers
from sfn_deploy.residual import core_sums

from .firegrid import FireGrid, grid_for, native
from .interpreter import Event, Observer, release_plan, run

_FOLLOW = {"reshape", "permute", "transpose", "flatten", "unsqueeze", "squeeze", "select", "slice", "expand", "pad",
           "upsample_nearest", "roll"}
_PRESERVE = {"reshape", "permute", "transpose", "flatten", "unsqueeze", "squeeze", "roll"}   # every element kept once
CONVENTIONS = ("spike", "event", "channel")
_PER_SAMPLE = ("mac_ann", "ac", "ac_event", "ac_channel", "mac", "host_ops", "spikes", "active", "channel_spikes",
               "ac_event_layer", "pool_events", "pool_active", "skip_events")

Totals = tuple[float, float, float]                             # Σ|y|, Σ1[y≠0], Σk (or those × fan-out)
Triple = tuple[torch.Tensor, torch.Tensor, torch.Tensor]        # per element: |y|, 1[y≠0], k


@dataclass
class LayerCount:
    name: str
    op: str
    kind: str
    source: str = ""
    stage: int = 0
    input: str = ""              # weight layers and products: "analog" or "spikes"
    mac_ann: float = 0.0
    ac: float = 0.0              # synaptic ops, spike convention (the paper's)
    ac_event: float = 0.0        # ... event convention
    ac_channel: float = 0.0      # ... channel convention
    mac: float = 0.0
    host_ops: float = 0.0
    spikes: float = 0.0          # SFN sites: Σ|y| per inference
    active: float = 0.0          # SFN sites: neurons with y ≠ 0 (graded events sent)
    channel_spikes: float = 0.0  # SFN sites: Σk, binary spikes after channel decomposition
    neurons: int = 0             # SFN sites: neurons; weight layers: output units (compartments)
    weights: int = 0             # stored weights (weight layers)
    fan_in: int = 0              # inputs per output unit (weight layers, products)
    connections: int = 0         # input→output pairs, padding excluded (weight layers)
    levels: int = 0              # SFN sites: N, thresholds per polarity
    dual: bool = False           # SFN sites: both polarities fire
    timesteps: int = 1           # neuron sites: steps per inference (multi-timestep baselines); MBE: internal steps
    bases: int = 0               # MBE nodes: basis units (neurons × N bases) per inference
    level_hist: dict[float, float] = field(default_factory=dict)   # SFN sites: level -> occurrences per inference
    # average pooling of a site's spikes as a pooling layer of graded neurons instead of folded (graded targets):
    ac_event_layer: float = 0.0  # weight layers reading such a pooling: event-convention synops in that form
    pool_events: float = 0.0     # the pooling node: events into its pooling layer (non-zero spike × windows)
    pool_active: float = 0.0     # ... its sum neurons that fire (non-zero window sums, per polarity)
    pool_neurons: int = 0        # ... its sum neurons (pooled elements × polarities)
    # a residual sum a graded chip runs on cores (sfn_deploy/residual.py): events of its operands that are a site's
    # spikes, each one synaptic op through the 1×1 shortcut synapse
    skip_events: float = 0.0

    @property
    def firing_rate(self) -> float:
        if self.bases:           # MBE: spikes per basis unit per internal step
            return self.spikes / (self.bases * self.timesteps)
        return self.active / (self.neurons * self.timesteps) if self.neurons and self.op in NEURON_OPS else 0.0

    def synops(self, convention: str = "spike") -> float:
        return {"spike": self.ac, "event": self.ac_event, "channel": self.ac_channel}[convention]

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "level_hist"}
        d["firing_rate"] = self.firing_rate
        if self.level_hist:
            d["level_hist"] = {str(k): v for k, v in sorted(self.level_hist.items())}
        return d

    def add_synops(self, ops: Totals) -> None:
        """Synaptic ops under the spike, event and channel conventions."""
        self.ac += ops[0]
        self.ac_event += ops[1]
        self.ac_channel += ops[2]


def _fanout(node: Node, x: torch.Tensor) -> torch.Tensor:
    """How many multiply-accumulates read each input element of a weight layer (one sample)."""
    if node.op == "linear":
        return torch.full((1,), float(node.params["weight"].shape[0]), device=x.device)
    a = node.attrs
    xs = torch.ones((1,) + tuple(x.shape[1:]), device=x.device, requires_grad=True)
    with torch.enable_grad():
        y = F.conv2d(xs, torch.ones_like(node.params["weight"]), None, a["stride"], a["padding"], a["dilation"],
                     a["groups"])
        (grad,) = torch.autograd.grad(y.sum(), xs)
    return grad[0]


def _sum(t: torch.Tensor) -> float:
    return float(t.sum(dtype=torch.float64))


def _times(totals: Totals, f: float) -> Totals:
    return totals[0] * f, totals[1] * f, totals[2] * f


def _each(fn: Callable[[torch.Tensor], torch.Tensor], t: Triple) -> Triple:
    return fn(t[0]), fn(t[1]), fn(t[2])


class _Spikes:
    """The spikes a tensor carries: the position (signed index + N, int32) per element, exact; or,
    after a summing pool, per-element sums of (|y|, 1[y≠0], k) that weight layers read with their fan-out."""

    def __init__(self, site: Node, index: torch.Tensor | None = None, sums: Triple | None = None,
                 whole: Totals | None = None, events: torch.Tensor | None = None):
        self.site, self.index, self.sums = site, index, sums    # index: the position
        self.events = events     # an average pooling's: non-zero window sums per element (its pooling-layer form)
        self.n = site.params["table"].numel() - 1 if "table" in site.params else 0    # MBE: sums only
        self.whole = whole        # totals, known while only element-preserving layout ops were applied

    def positions(self) -> torch.Tensor:
        if self.index is None:
            raise RuntimeError(f"positions of {self.site.name} were not kept but are needed")
        return self.index

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor], preserves: bool = False) -> _Spikes:
        if self.index is not None:
            return _Spikes(self.site, index=fn(self.index), whole=self.whole if preserves else None)
        if self.sums is None:          # positions not kept (nothing downstream reads them): totals only
            if not preserves:
                raise RuntimeError(f"positions of {self.site.name} were not kept but are needed")
            return self
        return _Spikes(self.site, sums=_each(fn, self.sums), events=None if self.events is None else fn(self.events))

    def triple(self) -> Triple:
        if self.sums is not None:
            return self.sums
        k = (self.positions() - self.n).abs_()
        return self.site.params["table"].to(torch.float32)[k], (k != 0).to(torch.float32), k.to(torch.float32)

    def totals(self) -> Totals:
        """Σ|y|, Σ1[y≠0], Σk over the whole tensor (exact)."""
        if self.whole is not None:
            return self.whole
        if self.sums is not None:
            return _sum(self.sums[0]), _sum(self.sums[1]), _sum(self.sums[2])
        hist = torch.bincount(self.positions().reshape(-1), minlength=2 * self.n + 1)
        return _hist_totals(hist, self.site.params["table"], self.n)

    def weighted(self, fan: torch.Tensor) -> Totals:
        """Σ over elements of (|y|, 1[y≠0], k) × fan-out, fan-out given per sample element."""
        if fan.numel() == 1:
            return _times(self.totals(), float(fan))
        fan = fan.to(torch.float64)         # products in float64: Σ|y| × fan-out passes 2^24 on large layers
        if self.sums is not None:
            a, e, k = self.sums
            return _sum(a.sum(0) * fan), _sum(e.sum(0) * fan), _sum(k.sum(0) * fan)
        index = self.positions()
        sums = _native_spike_sums(self.site, index)
        if sums is not None:
            t = (sums.to(torch.float64) * fan.reshape(-1)).sum(1)
            return float(t[0]), float(t[1]), float(t[2])
        k = (index - self.n).abs_()         # the torch path (the GPU's): integer sums over the batch, then float64
        a = self.site.params["table"][k].sum(0)
        return _sum(a * fan), _sum((k != 0).sum(0) * fan), _sum(k.sum(0) * fan)


def _native_spike_sums(site: Node, index: torch.Tensor) -> torch.Tensor | None:
    """Per sample element, the batch sums of (|y|, 1[y≠0], k) (int64, 3 × elements) in one pass of the
    compiled loop (:mod:`sfn_deploy.simulators.firegrid`); None without it."""
    lib = native()
    if lib is None or index.dtype != torch.int32 or index.device.type != "cpu":
        return None
    w = _site_weights(site)[1]
    index = index.contiguous()
    batch = index.shape[0]
    elems = index.numel() // max(batch, 1)
    acc = torch.zeros(3, elems, dtype=torch.int64)
    lib.sfn_spike_sums(index.data_ptr(), batch, elems, w[0].data_ptr(), w[1].data_ptr(), w[2].data_ptr(),
                       acc.data_ptr())
    return acc


def _position_free(graph: Graph) -> set[str]:
    """Sites whose positions the counter never reads: every consumer of their spikes needs only the
    site's totals (a linear layer, a spike product, a scaling, element-preserving layout ops leading to
    those). The interpreter then writes no position tensor for them (``OpCounter.skip_positions``)."""
    readers: dict[str, list[Node]] = {}
    for n in graph.nodes:
        for i in dict.fromkeys(n.inputs):
            readers.setdefault(i, []).append(n)

    def totals_only(name: str) -> bool:
        for r in readers.get(name, ()):
            if r.op == "linear" or (r.op == "matmul" and not r.attrs.get("mbe_product")):
                continue
            if r.kind == "host":
                if r.op in ("mul", "div") and len(r.inputs) == 1 and not totals_only(r.name):
                    return False
                continue
            if r.inputs[0] != name:
                continue                       # the counter follows spikes through first inputs only
            if r.op in _PRESERVE:
                if not totals_only(r.name):
                    return False
            elif r.op == "conv2d" or r.op in _FOLLOWERS:     # reads positions (or per-element sums of them)
                return False
        return True
    return {n.name for n in graph.nodes if n.op in NEURON_OPS and totals_only(n.name)}


def _hist_weights(table: torch.Tensor, n: int) -> tuple[list[float], list[int]]:
    """|y| and k of each position, the weights that turn a histogram into totals."""
    t = table.tolist()
    return t[:0:-1] + t, list(range(n, 0, -1)) + list(range(n + 1))


def _site_weights(site: Node) -> tuple[tuple[list[float], list[int]], torch.Tensor]:
    """The site's (|y|, k) per position as lists, and (|y|, 1[y≠0], k) as an int64 3 × positions tensor for
    the compiled loop; cached per node (``neurons.NODE_CACHE``), rebuilt when ``passes.configure`` replaces its
    table."""
    table = site.params["table"]

    def build() -> tuple[tuple[list[float], list[int]], torch.Tensor]:
        mag, k = _hist_weights(table, table.numel() - 1)
        return (mag, k), torch.tensor([mag, [int(v != 0) for v in k], k], dtype=torch.int64)
    return NODE_CACHE.get(site, "spike_weights", (table,), build)


def _hist_totals(hist: torch.Tensor, table: torch.Tensor, n: int,
                 weights: tuple[list[float], list[int]] | None = None) -> Totals:
    """Σ|y|, Σ1[y≠0], Σk from a histogram of positions: integer arithmetic, exact."""
    mag, k = weights if weights is not None else _hist_weights(table, n)
    h = hist.tolist()
    return (float(sum(a * b for a, b in zip(h, mag, strict=True))), float(sum(h) - h[n]),
            float(sum(a * b for a, b in zip(h, k, strict=True))))


def _first(event: Event) -> bool:
    """The ANN reference is counted once per inference: at the first step (or the only one)."""
    return (event.t or 0) == 0


class OpCounter(Observer):
    """An interpreter observer that accumulates per-layer counts over batches.

    Each event is dispatched through two tables at the end of this module: :data:`_COUNTERS`, keyed by op or,
    for all the ops of a kind, by op kind (``sfn_deploy/ops.py``), whose methods ``(c, event, out)`` add to the
    layer's counts; else :data:`_FOLLOWERS`, keyed by op, whose methods ``(node, spikes, out) -> spikes`` carry
    the spikes of the first input (``_Spikes``) to the output for the weight layers and products that read
    them. MBE events (``event.mbe``: any node run in its spiking MBE form) all go to :meth:`_mbe`. Counting a
    new op is one entry in one of the tables; an op in neither adds nothing and drops its input's spikes."""

    wants_hist = True        # the interpreter hands each site's histogram of positions (event.hist)
    reads_private_inputs = False    # a site or an in-place op may write its output over its input

    def __init__(self, graph: Graph, spiking: bool = True):
        self.graph = graph
        self.spiking = spiking
        st = graph.stages()
        self.layers = {n.name: LayerCount(n.name, n.op, n.kind, n.source, st[n.name]) for n in graph.nodes}
        self.samples = 0
        self.batch = 0
        self._shadow: dict[str, _Spikes] = {}     # spikes carried along layout/pool ops
        self._fan: dict[str, torch.Tensor] = {}
        self._hist: dict[str, torch.Tensor] = {}
        self._orders: dict[str, list[list[float]]] = {}   # products: op totals of each operand order
        self._grids: dict[str, FireGrid | None] = {}
        self._free = release_plan(graph)
        self.skip_positions = _position_free(graph) if spiking else set()
        self.pool_candidates = set(pooling_layers(graph)) if spiking else set()
        self.core_sums = core_sums(graph) if spiking else {}
        self.kept = frozenset(graph[n].inputs[k] for n, ks in self.core_sums.items() for k in ks)  # read by _host

    def start_batch(self, batch: int) -> None:
        self.samples += batch
        self.batch = batch
        self._shadow = {}

    def __call__(self, event: Event) -> None:
        node = event.node
        assert event.out is not None
        self._count(self.layers[node.name], event, event.out)
        for name in self._free.get(node.name, ()):
            self._shadow.pop(name, None)

    def _count(self, c: LayerCount, event: Event, out: torch.Tensor) -> None:
        node = event.node
        if event.mbe is not None:               # an MBE neuron or spiking decomposition (--method mbe)
            self._mbe(c, event, event.mbe)
            return
        count = _COUNTERS.get(node.op) or _COUNTERS.get(node.kind)
        if count is not None:
            count(self, c, event, out)
            return
        follow = _FOLLOWERS.get(node.op)
        spikes = self._shadow.get(node.inputs[0]) if follow is not None and node.inputs else None
        if follow is not None and spikes is not None:
            self._shadow[node.name] = follow(self, node, spikes, out)

    # ------------------------------------------------------------ counters: (c, event, out)

    def _mbe(self, c: LayerCount, event: Event, mbe: dict) -> None:
        """MBE basis spikes (one AC each), coincidences, and the node's float work as host ops."""
        b = max(self.batch, 1)
        c.spikes += mbe["spikes"]
        c.active += mbe["events"]
        c.channel_spikes += mbe["spikes"]
        c.add_synops((mbe["spikes"] + mbe["coincidences"], mbe["events"] + mbe["coincidence_events"],
                      mbe["spikes"] + mbe["coincidences"]))
        c.host_ops += mbe["host_ops"]
        c.neurons, c.bases, c.timesteps = mbe["neurons"] // b, mbe["bases"] // b, int(mbe["T"])
        if event.counts is not None:        # its spikes drive the next layer
            ns, ne = event.counts
            self._shadow[event.node.name] = _Spikes(event.node, sums=(ns, ne, ns))

    def _site(self, c: LayerCount, event: Event, out: torch.Tensor) -> None:
        """A neuron site: its spikes (from the histogram of positions), and its positions as the shadow."""
        node = event.node
        table = node.params["table"]
        c.neurons = out[0].numel()
        c.levels = n = table.numel() - 1
        c.dual = bool(node.params["bounds_neg"].numel())
        c.timesteps = int(event.T or 1)
        k, hist = event.position, event.hist
        if hist is None:
            if k is None:
                return
            hist = torch.bincount(k.reshape(-1), minlength=2 * n + 1)
        hist = hist.cpu()                        # (a GPU's: 2N+1 integers, kept and summed on the host)
        acc = self._hist.get(node.name)
        self._hist[node.name] = hist.clone() if acc is None else acc.add_(hist)
        spikes, active, channels = _hist_totals(hist, table, n, _site_weights(node)[0])
        self._shadow[node.name] = _Spikes(node, index=k, whole=(spikes, active, channels))
        c.spikes += spikes
        c.active += active
        c.channel_spikes += channels

    def _weight(self, c: LayerCount, event: Event, out: torch.Tensor) -> None:
        """conv2d, linear: the ANN's MACs; with spikes in, each spike's fan-out in ACs, else MACs."""
        node, x = event.node, event.args[0]
        w = node.params["weight"]
        per_out = w[0].numel() if node.op == "conv2d" else w.shape[1]
        mac = float(out.numel()) * per_out
        c.mac_ann += mac if _first(event) else 0.0
        c.weights, c.fan_in, c.neurons = w.numel(), per_out, out[0].numel()
        fan = self._fan.get(node.name)
        if fan is None:
            self._fan[node.name] = fan = _fanout(node, x)
            c.connections = int(fan.sum()) if node.op == "conv2d" else int(fan[0]) * x[0].numel()
        spikes = self._shadow.get(node.inputs[0])
        if spikes is None:
            c.input = "analog"
            c.mac += mac
        else:
            c.input = "spikes"
            c.add_synops(spikes.weighted(fan))
            if spikes.events is not None:       # reading an average pooling: its pooling-layer form's events
                ev = spikes.events.to(torch.float64)
                c.ac_event_layer += _sum(ev) * float(fan) if fan.numel() == 1 else _sum(ev.sum(0) * fan)

    def _product(self, c: LayerCount, event: Event, out: torch.Tensor) -> None:
        """matmul A·B. With spikes in A each spike of A is added into the N columns of B; with spikes in B,
        each spike of B into the M rows of A. With both, the cheaper order over the data, per convention
        (:meth:`result`); under the expectation compensation both; MBE products: coincidences."""
        node, (a, b) = event.node, event.args
        kdim = a.shape[-1]
        mac = float(out.numel()) * kdim
        c.mac_ann += mac if _first(event) else 0.0
        c.fan_in = kdim
        sa, sb = self._shadow.get(node.inputs[0]), self._shadow.get(node.inputs[1])
        if node.attrs.get("mbe_product") and sa is not None and sb is not None:
            (ca, ea, _), (cb, eb, _) = sa.triple(), sb.triple()    # spike and event counts per element
            c.input = "spikes"
            coincidences = _sum(torch.matmul(ca, cb))
            c.ac, c.ac_channel = c.ac + coincidences, c.ac_channel + coincidences
            c.ac_event += _sum(torch.matmul(ea, eb))
            return
        ways = [_times(sa.totals(), b.shape[-1])] if sa is not None else []
        if sb is not None:
            ways.append(_times(sb.totals(), a.shape[-2]))
        if not ways:
            c.input = "analog"
            c.mac += mac
            return
        c.input = "spikes"
        if event.ecm:          # A(t)·S_B + S_A·B(t): every spike of either operand is used
            for way in ways:
                c.add_synops(way)
            if sa is None or sb is None:              # the analog operand's increment is a dense product
                c.mac += mac
            c.host_ops += float(out.numel())          # the 1/t scalings of the compensation
            return
        acc = self._orders.setdefault(node.name, [[0.0] * 3 for _ in ways])
        for total, way in zip(acc, ways, strict=True):
            for i, v in enumerate(way):
                total[i] += v

    def _host(self, c: LayerCount, event: Event, out: torch.Tensor) -> None:
        """Host operations: one per output element; a residual sum that can run on cores also counts its
        spike operands' events (the non-zero values the sum reads: after a shortcut's slices and padding)."""
        c.host_ops += float(out.numel())
        for k in self.core_sums.get(event.node.name, ()):
            c.skip_events += _sum(event.args[k] != 0)

    def _scaling(self, c: LayerCount, event: Event, out: torch.Tensor) -> None:
        """mul, div: host operations; by a scalar, the spikes stay spikes (scaled)."""
        self._host(c, event, out)
        node = event.node
        if len(event.args) == 1 and node.inputs[0] in self._shadow:
            self._shadow[node.name] = self._shadow[node.inputs[0]]

    # ------------------------------------------------------------ followers: (node, spikes in, out) -> spikes out

    def _layout(self, node: Node, s: _Spikes, out: torch.Tensor) -> _Spikes:
        """Layout ops move positions as they move values."""
        return s.map(lambda t: apply(node, [t], self.graph, self.batch), preserves=node.op in _PRESERVE)

    def _pad(self, node: Node, s: _Spikes, out: torch.Tensor) -> _Spikes:
        """Zero-padded positions are silent (position N, level 0); reflect / replicate / circular padding copies
        the edge's positions."""
        if s.index is None:
            return self._layout(node, s, out)
        mode = node.attrs.get("mode", "constant")
        if mode != "constant":          # (F.pad has no integer reflect/replicate: positions are small, exact in float)
            return _Spikes(s.site, index=F.pad(s.index.double(), node.attrs["pad"], mode).to(s.index.dtype))
        return _Spikes(s.site, index=F.pad(s.index, node.attrs["pad"], "constant", s.n))

    def _max_pool(self, node: Node, s: _Spikes, out: torch.Tensor) -> _Spikes:
        grid = self._recoverable(s.site) if s.index is not None else None
        if grid is not None:     # the pooled values are table values: read their positions back
            _, index, _ = grid.fire(out, level_table(s.site, out.dtype))      # one pass of the fire loop
            return _Spikes(s.site, index=index)
        # the value is monotone in the index: pooling it picks the same element
        return s.map(lambda t: apply(node, [t.to(torch.float32)], self.graph, self.batch).to(t.dtype))

    def _avg_pool(self, node: Node, s: _Spikes, out: torch.Tensor) -> _Spikes:
        a = node.attrs
        return self._summed(node, s, lambda t: F.avg_pool2d(
            t, a["kernel_size"], a["stride"], a["padding"], a["ceil_mode"], a["count_include_pad"], 1))

    def _adaptive_pool(self, node: Node, s: _Spikes, out: torch.Tensor) -> _Spikes:
        shape = s.triple()[0].shape
        k = shape[-2] * shape[-1] / (out.shape[-2] * out.shape[-1])
        return self._summed(node, s, lambda t: F.adaptive_avg_pool2d(t, node.attrs["output_size"]) * k)

    def _reduce(self, node: Node, s: _Spikes, out: torch.Tensor) -> _Spikes:
        a = node.attrs
        return self._summed(node, s, lambda t: t.sum(a["dims"], keepdim=a["keepdim"]))

    def _summed(self, node: Node, s: _Spikes, window_sum: Callable[[torch.Tensor], torch.Tensor]) -> _Spikes:
        """A pooling's window sums of (|y|, 1[y≠0], k), which the weight layers reading it take with their
        fan-out (the folded form). For a pooling-layer candidate also that form's figures: events into the
        layer (each non-zero spike once per window holding it), its sum neurons per polarity and the non-zero
        sums among them, and per pooled element the events its readers receive."""
        sums = _each(window_sum, s.triple())
        if node.name not in self.pool_candidates or s.index is None:
            return _Spikes(s.site, sums=sums)
        c = self.layers[node.name]
        ev = (window_sum((s.index > s.n).to(torch.float32)) > 0).to(torch.float32)
        polarities = 1
        if s.site.params["bounds_neg"].numel():
            ev = ev + (window_sum((s.index < s.n).to(torch.float32)) > 0).to(torch.float32)
            polarities = 2
        c.pool_events += _sum(sums[1])
        c.pool_active += _sum(ev)
        c.pool_neurons = ev[0].numel() * polarities
        return _Spikes(s.site, sums=sums, events=ev)

    def _recoverable(self, site: Node) -> FireGrid | None:
        """The site's fire table if it maps every reachable output value back to its own position."""
        if site.name not in self._grids:
            grid, n = grid_for(site), site.params["table"].numel() - 1
            if grid is not None:
                lo = 0 if site.params["bounds_neg"].numel() else n      # one branch: levels 0..N only
                values = level_values(site, signed_table(site))[lo:]
                if not torch.equal(grid.position(values).to("cpu", torch.int64), torch.arange(lo, 2 * n + 1)):
                    grid = None
            self._grids[site.name] = grid
        return self._grids[site.name]

    def state(self) -> dict:
        """The totals a pass accumulated (what :meth:`absorb` sums across torchrun ranks)."""
        return {"samples": self.samples,
                "layers": {n: {f.name: getattr(c, f.name) for f in fields(c) if f.name != "level_hist"}
                           for n, c in self.layers.items()},
                "hist": self._hist, "orders": self._orders}

    def absorb(self, states: list[dict]) -> None:
        """Become the sum of the ranks' counters (``states`` in rank order): per-sample totals, level histograms
        and operand-order totals added; the layer's static figures (neurons, weights, ...) from a rank that
        counted samples."""
        self.samples = sum(s["samples"] for s in states)
        counted = [s for s in states if s["samples"]] or states[:1]
        for name, c in self.layers.items():
            for f in fields(c):
                if f.name in _PER_SAMPLE:
                    setattr(c, f.name, sum(s["layers"][name][f.name] for s in states))
                elif f.name != "level_hist":
                    setattr(c, f.name, counted[0]["layers"][name][f.name])
        self._hist = {}
        for s in states:
            for name, h in s["hist"].items():
                self._hist[name] = h.clone() if name not in self._hist else self._hist[name] + h
        self._orders = {}
        for s in states:
            for name, orders in s["orders"].items():
                acc = self._orders.setdefault(name, [[0.0] * len(o) for o in orders])
                for a, o in zip(acc, orders, strict=True):
                    for i, v in enumerate(o):
                        a[i] += v

    def result(self) -> OpCounts:
        s = max(self.samples, 1)
        return OpCounts([self._per_inference(c, s) for c in self.layers.values()], self.samples)

    def _per_inference(self, c: LayerCount, samples: int) -> LayerCount:
        """A copy of the layer's counts divided by the samples (products: the cheaper order's), with its
        histogram of levels."""
        c = replace(c)
        orders = self._orders.get(c.name)
        if orders is not None:
            c.ac = min(order[0] for order in orders)
            c.ac_event = min(order[1] for order in orders)
            c.ac_channel = min(order[2] for order in orders)
        for f in _PER_SAMPLE:
            setattr(c, f, getattr(c, f) / samples)
        hist = self._hist.get(c.name)
        if hist is not None:
            levels = signed_table(self.graph[c.name]).tolist()
            c.level_hist = {levels[i]: v / samples for i, v in enumerate(hist.tolist()) if v}
        return c


Counter = Callable[[OpCounter, LayerCount, Event, torch.Tensor], None]
Follower = Callable[[OpCounter, Node, _Spikes, torch.Tensor], _Spikes]

# What each op adds to its layer's counts: keyed by op, or by op kind (sfn_deploy/ops.py) for all the ops of a kind.
_COUNTERS: dict[str, Counter] = {
    **dict.fromkeys(NEURON_OPS, OpCounter._site),
    "weight": OpCounter._weight,             # conv2d, linear
    "product": OpCounter._product,           # matmul
    "host": OpCounter._host,
    "mul": OpCounter._scaling,
    "div": OpCounter._scaling,
}
# How the layout and pooling ops carry the spikes of their first input (they add no ops): keyed by op.
_FOLLOWERS: dict[str, Follower] = {
    **dict.fromkeys(_FOLLOW, OpCounter._layout),
    "pad": OpCounter._pad,
    "max_pool2d": OpCounter._max_pool,
    "avg_pool2d": OpCounter._avg_pool,
    "adaptive_avg_pool2d": OpCounter._adaptive_pool,
    "mean": OpCounter._reduce,
    "sum": OpCounter._reduce,
}


@dataclass
class OpCounts:
    layers: list[LayerCount]
    samples: int

    @property
    def mac_ann(self) -> float:
        return sum(c.mac_ann for c in self.layers)

    @property
    def ac_snn(self) -> float:
        return sum(c.ac for c in self.layers)

    @property
    def mac_snn(self) -> float:
        return sum(c.mac for c in self.layers)

    @property
    def host_ops(self) -> float:
        return sum(c.host_ops for c in self.layers)

    def synops(self, convention: str = "spike") -> float:
        return sum(c.synops(convention) for c in self.layers)

    def host_ops_by_op(self) -> dict[str, float]:
        """Host work (LayerNorm, softmax, GELU, residual arithmetic, ...) named by operation."""
        out: dict[str, float] = {}
        for c in self.layers:
            if c.host_ops:
                out[c.op] = out.get(c.op, 0.0) + c.host_ops
        return out

    def energy_ratio(self, e_ac: float = 0.9, e_mac: float = 4.6, convention: str = "spike") -> float:
        """(#AC_SNN·E_AC + #MAC_SNN·E_MAC) / (#MAC_ANN·E_MAC), eq. 43."""
        if not self.mac_ann:
            return 0.0
        return (self.synops(convention) * e_ac + self.mac_snn * e_mac) / (self.mac_ann * e_mac)

    def energy_ratio_approx(self, e_ac: float = 0.9, e_mac: float = 4.6) -> float:
        """#AC_SNN·E_AC / (#MAC_ANN·E_MAC), eq. 44 (the paper's approximation: MACs of the first layer dropped)."""
        return self.ac_snn * e_ac / (self.mac_ann * e_mac) if self.mac_ann else 0.0

    def per_stage(self, convention: str = "spike") -> list[dict]:
        """Totals per pipeline step: what one inference does at each timestep of the stream."""
        steps: dict[int, dict] = {}
        for c in self.layers:
            if not (c.mac_ann or c.host_ops or c.neurons):
                continue
            d = steps.setdefault(c.stage, {"stage": c.stage, "synops": 0.0, "mac": 0.0, "host_ops": 0.0,
                                           "neuron_updates": 0, "layers": []})
            d["synops"] += c.synops(convention)
            d["mac"] += c.mac
            d["host_ops"] += c.host_ops
            if c.op in NEURON_OPS:
                d["neuron_updates"] += c.neurons * c.timesteps
            d["layers"].append(c.name)
        return [steps[k] for k in sorted(steps)]

    def reported_layers(self) -> list[dict]:
        return [c.to_dict() for c in self.layers
                if c.mac_ann or c.ac or c.mac or c.host_ops or c.neurons]


def count_ops(graph: Graph, batches, spiking: bool = True) -> OpCounts:
    """Run the graph over ``batches`` and return per-inference counts."""
    counter = OpCounter(graph, spiking)
    for xb in batches:
        counter.start_batch(xb.shape[0])
        run(graph, xb, spiking=spiking, hook=counter)
    return counter.result()
