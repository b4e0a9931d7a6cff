"""Lowering a converted network to Lava: a plan of processes and connections, as plain data.

The plan is what a bundle stores and what :mod:`.build` turns into Lava processes; it needs
neither Lava nor torch to read. Each block is one Lava process:

* ``neuron``: an SFN site (:class:`SFNNeuron`), the bias of the synaptic layer in front of it
  folded in (Lava's Dense and Conv have no bias);
* ``dense`` / ``sparse`` / ``conv``: a weight layer (Lava's Dense, Sparse, or Conv). The spike
  scale λθ (graded) or the level increments (y_g − y_{g−1})·λθ (channels) are folded into
  the weights, so spikes carry integer levels or single bits. A dual site drives one process
  per polarity, both summed at the consumer. Linear layers over tokens (leading axes besides
  the batch) are a Sparse block-diagonal matrix: Loihi has no weight sharing across tokens.
* ``host``: what neuro-cores cannot do (LayerNorm, softmax, GELU, products of two spike tensors,
  residual adds other than :func:`residual_sums`, max pooling of graded spikes, layout), the input encoder
  and the output decoder. A residual sum on cores has no block: both operands' synapses drive its neurons.
  Host nodes of the same pipeline stage joined by host→host edges share one process.

Timing: every synaptic process adds one step, so a value's *stage* is the number of synaptic
layers on its longest path from the input; sample b reaches a stage-s value at step b+1+s. Host
blocks delay their inputs to their own stage (FIFOs on the host), so every multi-input operation
sees one sample.

Fixed point (Loihi): weights are 8-bit integers with one power-of-two exponent per layer; a
neuron's membrane is the integer accumulator plus an integer bias (24 bits) compared with
integer thresholds ceil(b / scale). Values the host sends to the chip are integers: the input
at 8 bits over its range, a neuron's input at the neuron's scale, spikes as levels.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ...clips import neuron_clips
from ...errors import UserError
from ...ir import Graph, Node
from ...pooling import SUMMING, SumKernel, pooling_layers, spike_poolings, sum_kernel, window
from ...residual import core_sums
from ...samples import regular

LOWERINGS = ("graded", "channels")
PRECISIONS = ("floating_pt", "fixed_pt")
AVG_POOLS = ("folded", "layer")     # average pooling of spikes: folded into the next weights, or a pooling layer
WEIGHT_BITS = 8
ACC_BITS = 24
INPUT_BITS = 8
MAX_HOST_PORTS = 256      # of each kind on a HostOp (procs.processes.MAX_PORTS)
LATTICE_OPS = {"reshape", "permute", "transpose", "flatten", "unsqueeze", "squeeze", "select", "slice",
                "max_pool2d"}   # a spike tensor passes through these as levels (max is monotone in the level)
_SAME_BOUND = LATTICE_OPS | {"relu", "avg_pool2d", "adaptive_avg_pool2d", "mean", "expand", "roll", "cat",
                              "upsample_nearest", "upsample_bilinear"}
_UNIT_BOUND = {"sigmoid", "hardsigmoid", "tanh", "softmax", "sign"}
_SMALL_NEGATIVE = {"gelu": 0.17, "silu": 0.28, "hardswish": 0.375, "mish": 0.31}    # |f(x)| ≤ max(|x|, this)
_ACTIVATIONS = {"hardtanh", "leaky_relu", "prelu", "elu", "softplus", "abs",     # between a split layer and its
                "threshold", *_SMALL_NEGATIVE}                                     # neurons (_fine_exponent)


# |f(x)| from the bound b of |x| for pointwise ops whose bound depends on their attributes
_POINTWISE_BOUND: dict[str, Callable[[Node, float], float | None]] = {
    "leaky_relu": lambda n, b: b * max(1.0, abs(float(n.attrs["negative_slope"]))),
    "prelu": lambda n, b: b * max(1.0, float(n.params["weight"].abs().max())),
    "elu": lambda n, b: abs(float(n.attrs["scale"])) * max(b, abs(float(n.attrs["alpha"]))),   # down to −scale·α
    "softplus": lambda n, b: b + math.log(2.0) / float(n.attrs["beta"]),        # ≤ max(x, 0) + ln 2 / β
    "abs": lambda n, b: b,
    "threshold": lambda n, b: max(b, abs(float(n.attrs["value"]))),
    "amax": lambda n, b: b,
    "sqrt": lambda n, b: math.sqrt(b),
    "pow": lambda n, b: b ** float(n.attrs["exponent"]) if float(n.attrs["exponent"]) > 0 else None,
}


def residual_sums(graph: Graph, pool_layers=frozenset()) -> tuple[Graph, set[str]]:
    """Residual sums that run on cores (graded lowering; which: :func:`sfn_deploy.residual.core_sums`). The
    neurons after one integrate both operands' synaptic input (Lava sums the connections into one ``a_in``), in one
    integer unit; a site's spikes reach them through a synapse this adds to the graph (``<add>_skip``): a depthwise
    1×1 convolution of ones, or a parameter-free shortcut's strided 1×1 convolution placing each channel (the same
    values in float32, so the SNN is unchanged; the shortcut's slices and padding are removed). Returns the graph
    (a copy where it changed) and the names of those sums; the other sums stay on the host."""
    import torch
    sums = core_sums(graph, pool_layers)
    if not any(sums.values()):
        return graph, set(sums)
    dropped = {v for spikes in sums.values() for cut in spikes.values() for v in cut.chain}
    nodes: list[Node] = []
    taken = {n.name for n in graph}
    for n in graph:
        if sums.get(n.name):
            n = Node(n.name, n.op, list(n.inputs), dict(n.attrs), dict(n.params), list(n.shape), n.bdim, n.source)
            for k, cut in sums[n.name].items():
                name, j = f"{n.name}_skip", 1
                while name in taken:
                    j += 1
                    name = f"{n.name}_skip_{j}"
                taken.add(name)
                c_out, c_in = n.shape[1], graph[cut.spikes].shape[1]
                if cut.channels is None:        # identity: depthwise ones
                    w, groups = torch.ones(c_out, 1, 1, 1), c_out
                else:                           # channel c lands on c + the channels padded before it
                    w, groups = torch.zeros(c_out, c_in, 1, 1), 1
                    w[torch.arange(c_in) + cut.channels[0], torch.arange(c_in)] = 1.0
                nodes.append(Node(name, "conv2d", [cut.spikes], {"stride": list(cut.stride), "padding": [0, 0],
                                                               "dilation": [1, 1], "groups": groups},
                                  {"weight": w}, list(n.shape), 0,
                                  f"shortcut synapse of the residual sum {n.name} (exporters/lava/plan.py)"))
                n.inputs[k] = name
        nodes.append(n)
    return Graph([n for n in nodes if n.name not in dropped], graph.output, graph.timesteps, graph.method,
                 graph.output_parts), set(sums)


@dataclass
class Block:
    name: str
    kind: str                                       # neuron | dense | sparse | conv | host
    stage: int
    attrs: dict = field(default_factory=dict)       # JSON-able
    arrays: dict = field(default_factory=dict)      # name -> np.ndarray
    ir: list = field(default_factory=list)          # converted-graph nodes it computes

    @property
    def where(self) -> str:
        return "host" if self.kind == "host" else "neuro-core"


@dataclass
class _Source:
    """The spikes a synaptic layer reads: the site whose levels (steps) they are worth, the (block, port) of each
    polarity (None: sent by a host block), and the divisor of a pooling layer's window sums (1 otherwise)."""
    site: Node
    ports: dict | None
    divisor: float = 1.0


@dataclass
class Plan:
    lowering: str
    precision: str
    blocks: list
    connections: list            # dicts: src, src_port, dst, dst_port, view (None | ["to_whc", C, H, W] | ["from_whc"])
    input_block: str
    output_block: str
    latency: int                 # steps from a sample entering to its output
    input_shape: list
    output_shape: list
    sites: dict                  # site name -> {"block", "stage", "scale"} (scale of the neuron's membrane)

    def block(self, name: str) -> Block:
        return next(b for b in self.blocks if b.name == name)

    def pooling_layers(self) -> set[str]:
        """The average poolings this plan runs as pooling layers (their sum Conv blocks; max pooling's are not)."""
        return {b.attrs["layer"] for b in self.blocks if b.kind == "conv" and b.attrs.get("polarity") == "pool"
                and b.attrs.get("op") != "max_pool2d" and not b.attrs.get("relay")}

    def residual_sums(self) -> int:
        """Residual sums on cores: neurons driven by the synapses of two weight layers."""
        layer = {b.name: b.attrs["layer"] for b in self.blocks if b.kind in ("conv", "dense", "sparse")}
        drivers: dict[str, set] = {}
        for c in self.connections:
            if c["dst_port"] == "a_in" and c["src"] in layer:
                drivers.setdefault(c["dst"], set()).add(layer[c["src"]])
        return sum(len(v) > 1 for v in drivers.values())

    def summary(self) -> dict:
        kinds: dict = {}
        for b in self.blocks:
            kinds[b.kind] = kinds.get(b.kind, 0) + 1
        host_ops = sorted({op for b in self.blocks if b.kind == "host" for op in b.attrs.get("ops", [])})
        return {"lowering": self.lowering, "precision": self.precision, "processes": len(self.blocks),
                "by_kind": kinds, "latency_steps": self.latency, "host_ops": host_ops,
                "neuro_core_processes": sum(b.where == "neuro-core" for b in self.blocks),
                "pooling_layers": len(self.pooling_layers()), "residual_sums": self.residual_sums(),
                "host_processes": sum(b.where == "host" for b in self.blocks)}


# -- fixed-point helpers ----------------------------------------------------------------------------------

def weight_exponent(w_abs_max: float, bits: int = WEIGHT_BITS) -> int:
    """Smallest e with max|w| / 2^e ≤ 2^(bits−1) − 1."""
    if w_abs_max <= 0:
        return 0
    return int(math.ceil(math.log2(w_abs_max / (2 ** (bits - 1) - 1))))


def quantise(w: np.ndarray, e: int, bits: int = WEIGHT_BITS) -> np.ndarray:
    lim = 2 ** (bits - 1) - 1
    return np.clip(np.rint(w / 2.0 ** e), -lim, lim).astype(np.int32)


def ceil_div(b: np.ndarray, scale: float) -> np.ndarray:
    return np.ceil(np.asarray(b, np.float64) / scale).astype(np.int64)


# -- the lowering ------------------------------------------------------------------------------------------

def _site_arrays(site: Node):
    p = site.params
    table = p["table"].numpy().astype(np.int64)
    return (p["bounds_pos"].numpy().astype(np.float32), p["bounds_neg"].numpy().astype(np.float32), table,
            p["steps"].double().numpy())


def _numel(shape) -> int:
    return int(np.prod(shape)) if len(shape) else 1


class _Lowering:
    def __init__(self, graph: Graph, input_shape, lowering: str, precision: str, input_abs_max: float | None,
                 split_weights: bool = True, avg_pool: str = "folded"):
        if lowering not in LOWERINGS:
            raise UserError(f"unknown Lava lowering {lowering!r}; choose one of {', '.join(LOWERINGS)}")
        if precision not in PRECISIONS:
            raise UserError(f"unknown Lava precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
        if avg_pool not in AVG_POOLS:
            raise UserError(f"unknown average-pooling form {avg_pool!r}; choose one of {', '.join(AVG_POOLS)}")
        if avg_pool == "layer" and lowering == "channels":
            raise UserError("a pooling layer sends graded sums; the channel lowering's spikes are binary: use "
                            "--avg-pool folded with --lowering channels")
        self.avg_pool = avg_pool
        graph, self.resums = residual_sums(graph, pooling_layers(graph) if avg_pool == "layer" else ()) \
            if lowering == "graded" else (graph, set())
        self.g, self.users = graph, graph.users()
        self.lowering, self.precision = lowering, precision
        self.fixed = precision == "fixed_pt"
        self.input_shape = list(input_shape)
        self.input_abs_max = input_abs_max
        self.split_weights = split_weights
        self.blocks: list[Block] = []
        self.by_name: dict[str, Block] = {}
        self.conns: list[dict] = []
        self.stage: dict[str, int] = {}
        self.lattice: dict[str, str] = {}      # value -> the site whose levels it carries
        self.block_of: dict[str, str] = {}     # IR node -> block computing it
        self.acc_scale: dict[str, float] = {}  # synaptic IR node -> scale of its integer accumulator
        self.sites: dict = {}
        self.input_like: set = set()
        self.core_pools: set = set()           # channel lowering: max pools done on cores (see _find_core_pools)
        self.aliases: set = set()              # flattens between such a pool and its synaptic layers
        self.folds: dict[str, str] = {}        # average pools of a site's spikes folded into linear layers -> site
        self.pool_layers: dict[str, tuple[str, SumKernel]] = {}  # pools lowered to pooling layers -> site, sum
        self.pool_blocks: dict[str, dict] = {}  # such a pool -> {polarity: its sum neuron block}
        self.bounds: dict[str, float | None] = {}  # value -> bound on |value| (None: not derived)
        self.delays: dict[str, int] = {}       # operand of a residual sum on cores -> steps its input is relayed
        self.clips: dict[str, float] = {}      # ReLU6-style clips folded into the neurons they feed -> the clip
        self.relay_heads: dict[str, dict] = {}  # a layer whose host-sent spikes are relayed -> {polarity: 1st Conv}

    # graph facts
    def cls(self, n: Node) -> str:
        if n.name in self.resums:
            return "resum"
        if n.name in self.clips:
            return "clip"
        if n.name in self.core_pools:
            return "pool"
        if n.name in self.pool_layers:
            return "sumpool"
        if n.name in self.aliases:
            return "alias"
        if n.name in self.folds:
            return "fold"
        if n.op in ("linear", "conv2d"):
            return "synapse"
        if n.op == "sfn":
            return "neuron"
        if n.op == "constant":
            return "constant"
        return "host"

    def _find_core_pools(self) -> None:
        """With threshold channels, max pooling of a (positive-only) site's spikes is exact on cores: the
        channels of a level are cumulative, so pooled channel g is the OR of the window's channel g, a
        depthwise sum (a Conv of ones) and a threshold at 1/2. Done where the pooled spikes reach only
        synaptic layers (through flattens, which are free in the flat C·H·W order)."""
        if self.lowering != "channels":
            return
        g = self.g

        def reaches_synapses(u: Node, chain: list) -> bool:
            if u.op in ("linear", "conv2d"):
                return True
            if u.op in ("flatten", "reshape") and u.bdim == 0 and len(u.shape) == 2:
                chain.append(u.name)
                return all(reaches_synapses(v, chain) for v in self.users[u.name])
            return False
        for n in g:
            a = n.attrs
            src = g[n.inputs[0]] if n.inputs else None
            if n.op != "max_pool2d" or src is None or src.op != "sfn" or src.params["bounds_neg"].numel() \
                    or n.bdim != 0 or any(a.get("padding", [0])) or a.get("ceil_mode") \
                    or any(d != 1 for d in a.get("dilation", [1])):
                continue
            chain: list = []
            if self.users[n.name] and all(reaches_synapses(u, chain) for u in self.users[n.name]):
                self.core_pools.add(n.name)
                self.aliases.update(chain)

    def _find_folds(self) -> None:
        """Average pooling (global means and sums too) of a site's spikes is an integer-weighted sum of the
        levels: where only weight layers read it, it is folded into their weights and those layers read the
        site's spikes on the cores: no host work, exact (up to the weights' quantisation). A linear layer
        (through flattens/reshapes keeping the batch axis first) gets W' = W·P, P the pooling; a convolution
        reading a pooling of disjoint windows (kernel = stride, no padding, the map divisible; global pooling
        too) gets a convolution over the unpooled map: its kernel repeated over each window, divided by the
        window's size, stride and padding times the window. Each pre-pool spike then carries the pooled
        position's full fan-out (see :func:`pool_event_counts`). With ``avg_pool="layer"`` the poolings that are
        window sums become pooling layers instead (:meth:`sum_pool`). Which poolings: :mod:`sfn_deploy.pooling`."""
        for name, chain in spike_poolings(self.g, self.users).items():
            site = self.g[name].inputs[0]
            kernel = sum_kernel(self.g, self.g[name]) if self.avg_pool == "layer" else None
            if kernel is not None:
                self.pool_layers[name] = (site, kernel)
                self.aliases.update(chain)         # the flattens read the sum neurons' spikes in C·H·W order
            else:
                for v in (name, *chain):
                    self.folds[v] = site

    def bound(self, n: Node) -> float | None:
        """A bound on |value| of node n, derived from the graph (the bounds of its inputs, known already):
        spikes are level × step (the site's largest level times its step), the input has its calibration
        range, a synaptic layer's output is bounded by its weights' absolute row sums times its input's
        bound plus the bias, a sum of values by the sum of their bounds, a mean or a layout op keeps its
        input's, a normalisation is bounded by its own parameters. None where it is not derived (an op
        not listed here, or an input without a bound)."""
        op, a, p = n.op, n.attrs, n.params
        ins = [self.bounds.get(i) for i in n.inputs]
        b0 = ins[0] if ins else None
        if op == "input":
            return float(self.input_abs_max) if self.input_abs_max else None
        if op == "constant":
            return float(p["value"].abs().max()) if p["value"].numel() else 0.0
        if op in _UNIT_BOUND:
            return 1.0
        if op == "sfn":
            _, bneg, table, steps = _site_arrays(n)
            npos = int(p["bounds_pos"].numel())
            return float(max(table[npos] * steps[0], table[bneg.size] * steps[1] if bneg.size else 0.0))
        if op in ("layer_norm", "group_norm", "batch_norm"):
            return self._norm_bound(n, b0)
        if op == "hardtanh":
            top = max(abs(a["min_val"]), abs(a["max_val"]))
            return top if b0 is None else min(b0, top)
        if any(b is None for b in ins):
            return None
        return self._arith_bound(n, ins)

    def _arith_bound(self, n: Node, ins: list) -> float | None:
        """bound() of an op whose inputs all have bounds."""
        op, a, p = n.op, n.attrs, n.params
        b0 = ins[0] if ins else 0.0
        if op in ("linear", "conv2d"):
            w = p["weight"].double().abs()
            rows = w.reshape(w.shape[0], -1).sum(1).max().item() if w.numel() else 0.0
            bias = p.get("bias")
            return rows * b0 + (float(bias.abs().max()) if bias is not None and bias.numel() else 0.0)
        if op in _SAME_BOUND:
            return max(ins)
        if op in _SMALL_NEGATIVE:
            return max(b0, _SMALL_NEGATIVE[op])
        if op in _POINTWISE_BOUND:
            return _POINTWISE_BOUND[op](n, b0)
        if op == "pad":
            return max(b0, abs(float(a.get("value", 0.0))))
        if op in ("add", "sub"):
            other = ins[1] if len(ins) > 1 else abs(float(a["other"]))
            return b0 + abs(float(a.get("alpha", 1))) * other
        if op == "mul":
            return b0 * (ins[1] if len(ins) > 1 else abs(float(a["other"])))
        if op == "div" and len(ins) == 1 and float(a["other"]) != 0:
            return b0 / abs(float(a["other"]))
        if op in ("sum", "vector_norm"):
            m = _numel(self.g[n.inputs[0]].shape[1:]) / max(_numel(n.shape[1:]), 1)
            return b0 * (math.sqrt(m) if op == "vector_norm" and a.get("ord", 2) == 2 else m)
        if op == "matmul":
            return ins[0] * ins[1] * int(self.g[n.inputs[0]].shape[-1])
        return None

    def _norm_bound(self, n: Node, b0: float | None) -> float | None:
        """Normalised entries: LayerNorm/GroupNorm over m values give |x̂| ≤ √(m−1), then the affine
        parameters; inference BatchNorm is an affine map per channel of its input's bound."""
        a, p = n.attrs, n.params
        w, bias = p.get("weight"), p.get("bias")
        wmax = float(w.abs().max()) if w is not None and w.numel() else 1.0
        bmax = float(bias.abs().max()) if bias is not None and bias.numel() else 0.0
        if n.op == "batch_norm":
            if b0 is None:
                return None
            scale = (w.double() if w is not None else 1.0) / (p["running_var"].double() + a["eps"]).sqrt()
            shift = (bias.double() if bias is not None else 0.0) - p["running_mean"].double() * scale
            return b0 * float(scale.abs().max()) + float(shift.abs().max())
        shape = self.g[n.inputs[0]].shape
        m = _numel(a["normalized_shape"]) if n.op == "layer_norm" else _numel(shape[1:]) // a["num_groups"]
        return math.sqrt(max(m - 1, 1)) * wmax + bmax

    def _find_clips(self) -> None:
        """Graded lowering: a clip to [0, c] (ReLU6) runs in the neurons it feeds (:mod:`sfn_deploy.clips`):
        they read the weight layer's sum and keep their thresholds up to c (:meth:`neuron`)."""
        if self.lowering == "graded":
            self.clips = neuron_clips(self.g, self.users)

    def analyse(self) -> None:
        self._find_core_pools()
        self._find_folds()
        self._find_clips()
        for n in self.g:
            self.bounds[n.name] = self.bound(n)
            if n.op == "constant":
                continue
            ins = [self.stage[i] for i in n.inputs if i in self.stage]
            s = max(ins, default=0)
            self.stage[n.name] = s + 1 if self.cls(n) in ("synapse", "pool", "sumpool") else s
            if n.op == "input" or (n.op in LATTICE_OPS and n.op != "max_pool2d" and n.inputs[0] in self.input_like):
                self.input_like.add(n.name)          # the input moved around: its range is the input's
            if n.op == "sfn":
                self.lattice[n.name] = n.name
            elif n.op in LATTICE_OPS and n.inputs and n.inputs[0] in self.lattice:
                self.lattice[n.name] = self.lattice[n.inputs[0]]
            if n.op == "conv2d" and not regular(n):
                raise UserError(f"Lava export: convolution {n.name} holds {n.shape[n.bdim or 0]} images per sample "
                                "(the batch axis folded into windows or patches, or not first); a Conv process "
                                "here holds one image of one sample: not supported")
        self._align_residual_sums()

    def _align_residual_sums(self) -> None:
        """Each operand of a residual sum on cores reaches its neurons at the sum's stage: an operand layer at an
        earlier stage reads its spikes (a site's, or those a host block sends) through relays (:meth:`_relay`),
        one step each. Every operand reads spikes (:func:`sfn_deploy.residual.core_sums`), so the operands add
        up in one integer unit (:meth:`_common_units`)."""
        for name in sorted(self.resums, key=lambda v: self.stage[v]):
            for o in self.g[name].inputs:
                if self.stage[o] < self.stage[name]:
                    self.delays[o] = self.stage[name] - self.stage[o]
                    self.stage[o] = self.stage[name]

    def host_groups(self) -> list[list[str]]:
        """Host nodes of equal stage joined by host→host edges (the input node is a host node)."""
        parent: dict[str, str] = {}

        def find(a):
            while parent[a] != a:
                parent[a] = parent[parent[a]]
                a = parent[a]
            return a
        host = [n.name for n in self.g if self.cls(n) == "host"]
        for h in host:
            parent[h] = h
        for n in self.g:
            if self.cls(n) != "host":
                continue
            for i in n.inputs:
                if i in parent and self.stage[i] == self.stage[n.name]:
                    parent[find(i)] = find(n.name)
        groups: dict[str, list[str]] = {}
        for h in host:
            groups.setdefault(find(h), []).append(h)
        return list(groups.values())

    # blocks
    def add(self, block: Block) -> Block:
        if block.name in self.by_name:
            raise RuntimeError(f"Lava lowering: two blocks named {block.name}")     # an internal error
        self.blocks.append(block)
        self.by_name[block.name] = block
        for n in block.ir:
            self.block_of[n] = block.name
        return block

    def connect(self, src, src_port, dst, dst_port, view=None) -> None:
        self.conns.append({"src": src, "src_port": src_port, "dst": dst, "dst_port": dst_port, "view": view})

    def lower(self) -> Plan:
        self.analyse()
        g = self.g
        out_node = g[g.output]
        groups = {h: grp for grp in self.host_groups() for h in grp}
        # host programs are filled after every block exists (their ports depend on producers and consumers)
        host_blocks: dict[str, Block] = {}
        on_cores = {"neuron": self.neuron, "synapse": self.synapse, "pool": self.core_pool, "sumpool": self.sum_pool,
                    "resum": lambda n: None}     # its operands' synapses drive its neurons
        for n in g:
            c = self.cls(n)
            if c == "host" and n.name not in self.block_of:
                grp = groups[n.name]
                name = "input" if n.op == "input" else f"host_{n.name}"
                b = self.add(Block(name, "host", self.stage[n.name], ir=list(grp)))
                host_blocks[b.name] = b
            elif c in on_cores:
                on_cores[c](n)
            elif c in ("alias", "fold", "clip"):
                self.block_of[n.name] = self.block_of[n.inputs[0]]
        out = self.add(Block("output", "host", self.stage[out_node.name], ir=[]))
        host_blocks["output"] = out
        self._common_units()
        for b in host_blocks.values():
            self.host_program(b, out_node)
        for b in self.blocks:                    # the neurons fed by host blocks know their scale only now
            if b.kind == "neuron":
                self.neuron_thresholds(b)
        for b in host_blocks.values():
            ports = [p["port"] for p in b.attrs["inputs"] + b.attrs["outputs"]]
            for kind in ("in", "out", "hout"):
                k = sum(p.rstrip("0123456789") == kind for p in ports)
                if k > MAX_HOST_PORTS:
                    raise UserError(f"Lava export: host block {b.name} needs {k} '{kind}' ports (a HostOp has "
                                    f"{MAX_HOST_PORTS})")
            for o in b.attrs["outputs"]:
                o.pop("_conn", None)
                if "neuron" in o:
                    o["scale"] = self.sites[o["neuron"]]["scale"]
        self._check_acyclic()
        return Plan(self.lowering, self.precision, self.blocks, self.conns, "input", "output",
                    self.stage[out_node.name], self.input_shape, list(out_node.shape[1:]), self.sites)

    def _common_units(self) -> None:
        """Fixed point: the operand layers of a residual sum on cores add up at its neurons in one integer unit,
        the finest of their exponents; the coarser layer's processes shift their sums up by the difference
        (Lava's weight_exp), as a split layer's coarse half does."""
        for name in self.resums:
            ops = set(self.g[name].inputs)
            blocks = [b for b in self.blocks if b.kind in ("conv", "dense", "sparse") and b.attrs["layer"] in ops]
            e = min(b.attrs["weight_exp"] for b in blocks)
            for b in blocks:
                b.attrs["shift"] += b.attrs["weight_exp"] - e
                b.attrs["weight_exp"] = e
                b.attrs["scale"] = 2.0 ** e if self.fixed else b.attrs["scale"]
            for o in ops:
                self.acc_scale[o] = blocks[0].attrs["scale"]
            self.acc_scale[name] = blocks[0].attrs["scale"]

    def _relay(self, spikes: _Source, value: str, steps: int, layer: str) -> _Source:
        """``spikes`` ``steps`` steps later: per polarity a chain of identity synapses (a depthwise 1×1 Conv of
        ones) into graded neurons that fire the level they receive (thresholds at every integer up to the
        largest level, as a pooling layer's sum neurons), one step each. Exact in fixed point. Spikes a host block
        sends (``spikes.ports`` None: max-pooled levels) enter the first Conv through the port ``host_program``
        gives them (``relay_heads``)."""
        bpos, bneg, table, _ = _site_arrays(spikes.site)
        shape = self.g[value].shape if spikes.ports is None else spikes.site.shape   # what the ports carry
        chw = list(shape[1:])
        ports: dict = dict(spikes.ports) if spikes.ports is not None else {"pos": None, "neg": None}
        start = self.stage[layer] - steps - 1          # the stage of the spikes relayed
        one = SumKernel([1, 1], [1, 1], [0, 0], 1)
        for k in range(1, steps + 1):
            for pol, nb in (("pos", bpos.size), ("neg", bneg.size)):
                if nb == 0 or pol not in ports:
                    continue
                base = f"relay{k}_{layer}" + ("" if pol == "pos" else "__neg")
                conv, neuron = self._sum_layer(f"{base}_syn", base, start + k, "conv2d", base, (value, value), chw, chw,
                                               one, int(table[nb]), [], ports[pol], {"relay": True})
                if ports[pol] is None:                 # fed by a host block's output (host_program)
                    self.relay_heads.setdefault(layer, {})[pol] = conv
                ports[pol] = (neuron, "s_pos")
        return _Source(spikes.site, {p: v for p, v in ports.items() if v is not None}, spikes.divisor)

    # -- neurons
    def neuron(self, site: Node) -> None:
        bpos, bneg, table, steps = _site_arrays(site)
        n = _numel(site.shape)
        src = self.g[site.inputs[0]]
        if self.cls(src) == "neuron":
            raise UserError(f"Lava export: site {site.name} reads another site ({src.name}) directly; not supported")
        clip = {}
        if src.name in self.clips:          # the neuron reads the layer's sum; no level beyond the clip
            clip = {"clip": self.clips[src.name]}
            bpos = bpos[bpos <= np.float32(clip["clip"])]
            src = self.g[src.inputs[0]]
        b = self.add(Block(f"sfn_{site.name}", "neuron", self.stage[site.name], ir=[site.name],
                           attrs={"n": n, "shape": list(site.shape[1:] if regular(site) else site.shape),
                                  "input": src.name,
                                  "dual": bool(bneg.size), "channels": self.lowering == "channels",
                                  "n_pos": int(bpos.size), "n_neg": int(bneg.size), **clip},
                           arrays={"bounds_pos": bpos, "bounds_neg": bneg, "table": table,
                                   "steps": steps.astype(np.float64)}))
        self.sites[site.name] = {"block": b.name, "stage": b.stage}

    def core_pool(self, p: Node) -> None:
        """Max pool of threshold channels on cores: depthwise sum Conv over every channel copy, then a
        neuron per pooled channel firing 1 when the window sum reaches 1 (OR)."""
        site = self.g[p.inputs[0]]
        a = p.attrs
        copies = int(site.params["bounds_pos"].numel())
        c, h, w = site.shape[1:]
        k = list(a["kernel_size"])
        st = list(a["stride"]) if a.get("stride") else k
        ch = copies * c
        conv = self.add(Block(f"pool_{p.name}", "conv", self.stage[p.name], arrays={
            "weight": np.ones((ch, k[1], k[0], 1))}, attrs={
            "op": "max_pool2d", "layer": p.name, "polarity": "pool", "input": site.name, "tokens": 1, "copies": 1,
            "copy_ids": None, "shift": 0, "in_n": copies * _numel(site.shape), "out_n": copies * _numel(p.shape),
            "weight_exp": 0, "scale": 1.0, "graded": False, "input_shape": [w, h, ch], "stride": st[::-1],
            "padding": [0, 0], "dilation": [1, 1], "groups": ch, "out_chw": [ch, *p.shape[2:]]}))
        self.connect(self.block_of[site.name], "s_pos", conv.name, "s_in", self._to_conv_view(conv))
        n = copies * _numel(p.shape)
        thr = np.array([1 if self.fixed else 0.5])
        any_ = self.add(Block(f"any_{p.name}", "neuron", self.stage[p.name], ir=[p.name], attrs={
            "n": n, "shape": [ch, *p.shape[2:]], "input": p.name, "dual": False, "channels": False, "n_pos": 1,
            "n_neg": 0, "pool": True, "scale": 1.0}, arrays={
            "bounds_pos": np.array([0.5], np.float32), "bounds_neg": np.zeros(0, np.float32),
            "table": np.array([0, 1]), "steps": np.array([1.0, 0.0]), "bias": np.zeros(n), "thr_pos": thr,
            "thr_neg": np.zeros(0)}))
        self.connect(conv.name, "a_out", any_.name, "a_in", self._from_conv_view(conv))

    def sum_pool(self, p: Node) -> None:
        """Average pooling of a site's spikes as a pooling layer: per polarity, a depthwise Conv of ones sums each
        window's levels and graded neurons send the integer sum on (thresholds at every integer up to the
        window's largest sum, so the level is the sum); the weight layers reading the pool divide by the window
        (:meth:`_weight_parts`). One event per pre-pool spike into the layer, then one per non-zero sum."""
        site_name, kernel = self.pool_layers[p.name]
        site = self.g[site_name]
        k = kernel.kernel
        bpos, bneg, table, _ = _site_arrays(site)
        c, h, w = site.shape[1:]
        out_chw = [c, *(p.shape[2:] if len(p.shape) == 4 else [1, 1])]
        self.pool_blocks[p.name] = {}
        for pol, nb, port in (("pos", bpos.size, "s_pos"), ("neg", bneg.size, "s_neg")):
            if nb == 0 and pol == "neg":
                continue
            suffix = "" if pol == "pos" else "__neg"
            top = k[0] * k[1] * int(table[nb])          # the largest window sum of this polarity's levels
            _, neuron = self._sum_layer(f"sumpool_{p.name}{suffix}", f"sum_{p.name}{suffix}", self.stage[p.name],
                                        p.op, p.name, (site.name, p.name), [c, h, w], out_chw, kernel, top,
                                        [p.name] if not suffix else [], (self.block_of[site.name], port))
            self.pool_blocks[p.name][pol] = neuron

    def _sum_layer(self, conv_name: str, neuron_name: str, stage: int, op: str, layer: str, inputs: tuple,
                   in_chw: list, out_chw: list, kernel: SumKernel, top: int, ir: list, src: tuple | None,
                   extra: dict | None = None) -> tuple[str, str]:
        """A depthwise Conv of ones over ``kernel``'s windows (``in_chw`` → ``out_chw``) into graded neurons that
        fire the integer window sum (thresholds at every integer up to ``top``): a pooling layer's blocks, and a
        relay step's (a 1×1 window). ``inputs``: the values the Conv and the neurons read; ``src``: the (block,
        port) feeding the Conv, None when a host block's port is connected later. The two blocks' names."""
        c, h, w = in_chw
        extra = extra or {}
        conv = self.add(Block(conv_name, "conv", stage, arrays={
            "weight": np.ones((c, kernel.kernel[1], kernel.kernel[0], 1))}, attrs={
            "op": op, "layer": layer, "polarity": "pool", "input": inputs[0], "tokens": 1, "copies": 1,
            "copy_ids": None, "shift": 0, "in_n": _numel(in_chw), "out_n": _numel(out_chw), "weight_exp": 0,
            "scale": 1.0, "graded": True, "input_shape": [w, h, c], "stride": kernel.stride[::-1],
            "padding": kernel.padding[::-1], "dilation": [1, 1], "groups": c, "out_chw": out_chw, **extra}))
        if src is not None:
            self.connect(src[0], src[1], conv.name, "s_in", self._to_conv_view(conv))
        bounds = np.arange(top, dtype=np.float32) + np.float32(0.5)
        n = _numel(out_chw)
        neuron = self.add(Block(neuron_name, "neuron", stage, ir=ir, attrs={
            "n": n, "shape": out_chw, "input": inputs[1], "dual": False, "channels": False, "n_pos": top,
            "n_neg": 0, "pool": True, **extra, "scale": 1.0}, arrays={
            "bounds_pos": bounds, "bounds_neg": np.zeros(0, np.float32), "table": np.arange(top + 1),
            "steps": np.array([1.0, 0.0]), "bias": np.zeros(n), "thr_pos": ceil_div(bounds, 1.0) if self.fixed
            else bounds, "thr_neg": np.zeros(0)}))
        self.connect(conv.name, "a_out", neuron.name, "a_in", self._from_conv_view(conv))
        return conv.name, neuron.name

    def neuron_thresholds(self, b: Block) -> None:
        """Bias and thresholds in the neuron's membrane units (float: the values themselves)."""
        if b.attrs.get("pool"):
            return
        src = self.g[b.attrs["input"]]
        n = b.attrs["n"]
        bias = np.zeros(n)
        layers = [src] if self.cls(src) == "synapse" else [self.g[o] for o in src.inputs] \
            if self.cls(src) == "resum" else []
        for layer in layers:                # a residual sum on cores: both operands' biases
            if layer.params.get("bias") is not None:
                bias = bias + _expand_bias(layer).astype(np.float64)
        bpos, bneg = b.arrays["bounds_pos"], b.arrays["bounds_neg"]
        if not self.fixed:
            b.arrays.update(bias=bias, thr_pos=bpos, thr_neg=bneg)
            scale = 1.0
        else:
            if layers:
                scale = self.acc_scale[src.name]
            else:                           # the host sends the value at a scale resolving every boundary
                top = float(max(np.abs(bpos).max(initial=0), np.abs(bneg).max(initial=0), 1e-30))
                scale = 2.0 ** math.ceil(math.log2(top / 2 ** (ACC_BITS - 3)))
            b.arrays.update(bias=np.rint(bias / scale).astype(np.int64), thr_pos=ceil_div(bpos, scale),
                            thr_neg=ceil_div(bneg, scale))
        b.attrs["scale"] = scale
        self.sites[b.ir[0]]["scale"] = scale

    # -- synapses
    def _spike_source(self, value: str) -> _Source | None:
        """What feeds a synaptic layer with spikes, or None for analog input."""
        if value in self.folds:            # pooled spikes folded into the weights: the site's own spikes
            site = self.g[self.folds[value]]
            b = self.block_of[site.name]
            return _Source(site, {"pos": (b, "s_pos"), "neg": (b, "s_neg")})
        producer = self.g[value]
        while producer.name in self.aliases:
            producer = self.g[producer.inputs[0]]
        if producer.name in self.pool_layers:    # a pooling layer's sums, one neuron block per polarity
            pooled, kernel = self.pool_layers[producer.name]
            return _Source(self.g[pooled], {pol: (b, "s_pos") for pol, b in self.pool_blocks[producer.name].items()},
                           float(kernel.divisor))
        site_name = self.lattice.get(value)
        if site_name is None:
            return None
        site = self.g[site_name]
        if producer.op == "sfn" or producer.name in self.core_pools:
            b = self.block_of[producer.name]
            return _Source(site, {"pos": (b, "s_pos"), "neg": (b, "s_neg")})
        return _Source(site, None)          # through a host block: ports assigned by host_program

    def synapse(self, n: Node) -> None:
        x = n.inputs[0]
        w = n.params["weight"].double().numpy()
        spikes = self._spike_source(x)
        if n.name in self.delays and spikes is not None:
            spikes = self._relay(spikes, x, self.delays[n.name], n.name)
        if spikes is None and self.cls(self.g[x]) != "host":
            raise UserError(f"Lava export: {n.name} ({n.op}) reads {x} ({self.g[x].op}) directly; a synaptic layer "
                            "must read spikes or a host value")
        token_dims = n.op == "linear" and _numel(n.shape[:-1]) > 1     # rows of one sample (tokens, windows)
        in_n = _numel(self.g[x].shape)
        conv = dict(n.attrs)
        src_shape = list(self.g[x].shape[1:])
        if x in self.folds and n.op == "linear":
            w = self._folded_weight(w, x)
            in_n = _numel(self.g[self.folds[x]].shape)
        elif x in self.folds:             # a convolution over the unpooled map (see _find_folds)
            win = window(self.g, self.g[x])
            assert win is not None, "_find_folds folds only such pools into convolutions"
            kh, kw = win
            w = np.repeat(np.repeat(w, kh, axis=2), kw, axis=3) / (kh * kw)
            conv.update(stride=[conv["stride"][0] * kh, conv["stride"][1] * kw],
                        padding=[conv["padding"][0] * kh, conv["padding"][1] * kw])
            src_shape = list(self.g[self.folds[x]].shape[1:])
            in_n = _numel(src_shape)
        parts = self._weight_parts(w, spikes)
        kind = "conv" if n.op == "conv2d" else "sparse" if token_dims else "dense"
        self._check_synapse(n, kind, spikes)
        e = weight_exponent(max(float(np.abs(m).max(initial=0)) for _, m in parts)) if self.fixed else 0
        procs, e, scale_in, split = self._processes(x, n, parts, e, spikes, w.shape[1])
        self.acc_scale[n.name] = scale_in * 2.0 ** e
        tokens = _numel(n.shape[:-1]) if token_dims else 1
        for k, (pol, m, e_q, shift, ids) in enumerate(procs):
            copies = m.shape[1] // w.shape[1] if ids is None else next(p[1].shape[1] for p in parts
                                                                       if p[0] == pol) // w.shape[1]
            arrays = {}
            if self.fixed:
                m = quantise(m, e_q).astype(np.float64)
            if kind == "conv":
                # Lava's layout (C_out, kW, kH, C_in)
                arrays["weight"] = np.ascontiguousarray(m[:, :, ::-1, ::-1].transpose(0, 3, 2, 1))
            elif kind == "sparse":
                arrays["weight"] = m            # expanded to kron(I_tokens, m) when built
            else:
                arrays["weight"] = m
            if self.fixed and kind != "conv":
                arrays["weight"] = 2 * arrays["weight"]   # Lava drops the LSB of mixed-sign weights: 2w, weight_exp −1
            attrs = {"op": n.op, "layer": n.name, "polarity": pol, "input": x, "tokens": tokens, "in_n": in_n,
                     "copies": copies, "copy_ids": ids, "shift": shift, "split": split,
                     "out_n": _numel(n.shape), "weight_exp": e, "scale": self.acc_scale[n.name],
                     "graded": spikes is None or self.lowering == "graded" or pol == "analog"}
            if kind == "conv":
                a = conv
                c_in = copies * w.shape[1] * a.get("groups", 1)
                attrs.update(input_shape=[src_shape[2], src_shape[1], c_in], stride=list(a["stride"])[::-1],
                             padding=list(a["padding"])[::-1], dilation=list(a["dilation"])[::-1],
                             groups=a.get("groups", 1), out_chw=list(n.shape[1:]))
            # "__": never a node name's suffix (node names are Python identifiers made unique with "_k")
            name = f"{kind}_{n.name}" + ("" if pol in ("analog", "pos") else "__neg") + (f"__g{k}" if k else "")
            blk = self.add(Block(name, kind, self.stage[n.name], attrs=attrs, arrays=arrays,
                                 ir=[n.name] if k == 0 else []))
            if spikes is not None and spikes.ports is not None:
                src, port = spikes.ports[pol]
                self.connect(src, port, blk.name, "s_in", self._to_conv_view(blk))
            # consumers are connected when they are built: neurons now, host blocks in host_program
            for user in self.users[n.name]:
                sites = [user] if user.op == "sfn" else \
                    self.users[user.name] if user.name in self.resums or user.name in self.clips else []
                for site in sites:
                    self.connect(blk.name, "a_out", self.block_of.get(site.name, f"sfn_{site.name}"), "a_in",
                                 self._from_conv_view(blk))
        self.block_of[n.name] = f"{kind}_{n.name}"

    def _folded_weight(self, w: np.ndarray, x: str) -> np.ndarray:
        """W·P: the linear layer's weights (out, in) composed with the pooling (and flattens) P from the
        site's spikes to its input x: each row is P's adjoint applied to the row (one vector-Jacobian
        product per row, float64; the pooling's own torch kernels, so any pooling the op table has)."""
        import torch

        from ...ops import apply
        site = self.g[self.folds[x]]
        chain = []
        v = self.g[x]
        while v.name != site.name:
            chain.append(v)
            v = self.g[v.inputs[0]]
        chain.reverse()

        def pooled(z):
            for node in chain:
                z = apply(node, [z], self.g, 1)
            return z.reshape(-1)
        _, vjp = torch.func.vjp(pooled, torch.zeros((1, *site.shape[1:]), dtype=torch.float64))
        rows = torch.func.vmap(vjp)(torch.from_numpy(np.ascontiguousarray(w, np.float64)))[0]
        return rows.reshape(w.shape[0], -1).numpy()

    def _processes(self, x: str, n: Node, parts: list, e: int, spikes, per: int):
        """(processes, the layer's exponent, the input's scale, split?): each process is (polarity, weights,
        their exponent, shift to the layer's exponent, channel copies held or None for all)."""
        procs = [(pol, m, e, 0, None) for pol, m in parts]
        split = False
        scale_in = self._input_scale(parts, e, float(self.bounds[x] or 1.0)) if spikes is None and self.fixed else 1.0
        if self.fixed and spikes is not None and self.lowering == "channels":
            procs, e = self._exponent_groups(parts, per)
        elif self.fixed and self.split_weights:
            if x in self.input_like and self.input_abs_max:
                # the network input: 8 bits over its range (images are 8-bit data: pixel k/255 is exact at
                # range 1), the accumulator's room spent on the weights instead, where that gains bits
                scale8 = float(self.input_abs_max) / 255
                if self._fine_exponent(n, e, scale8) <= e - 2:
                    scale_in = scale8
            procs, e, split = self._split(n, parts, e, scale_in)
        return procs, e, scale_in, split

    def _split(self, n: Node, parts: list, e: int, scale_in: float) -> tuple[list, int, bool]:
        """Fixed point, graded: each polarity's weights as two synapse groups summed at the consumer, the
        coarse 8-bit weights (exponent e, shifted to the fine unit) and the fine 8-bit remainder: about 15-bit
        weights where the accumulator has room (:meth:`_fine_exponent`). (procs, layer exponent, split?)"""
        e_fine = self._fine_exponent(n, e, scale_in)
        if e_fine >= e:
            return [(pol, m, e, 0, None) for pol, m in parts], e, False
        return [q for pol, m in parts for q in ((pol, m, e, e - e_fine, None),
                                                 (pol, m - quantise(m, e) * 2.0 ** e, e_fine, 0, None))], e_fine, True

    def _fine_exponent(self, n: Node, e: int, scale_in: float = 1.0) -> int:
        """The exponent of a split layer's fine group: up to 7 bits below the layer's own, as long as the
        accumulator (24 bits, in units of scale_in · 2^e_fine; Lava's Conv wraps there) keeps 4x headroom
        over the neurons the layer drives (directly, or through a residual add on the host): over their
        largest firing boundary, or twice the largest input calibration saw when that is smaller (the
        sformer's top levels lie far beyond what calibration sees); over the layer's derived bound where
        the sum reaches something else. Wrap-arounds and overflows are counted in the run."""
        top = 0.0
        todo, seen = [(u, 1.0) for u in self.users[n.name]], set()
        while todo:
            u, factor = todo.pop()
            if u.name in seen:
                continue
            seen.add(u.name)
            if u.op == "sfn":
                bp, bn, _, _ = _site_arrays(u)
                edge = max(float(np.abs(bp).max(initial=0)), float(np.abs(bn).max(initial=0)))
                seen_max = max(float(u.attrs.get("max_pos") or 0), float(u.attrs.get("max_neg") or 0))
                top = max(top, factor * (min(edge, 2 * seen_max) if seen_max > 0 else edge))
            elif self.cls(u) in ("host", "resum") and u.op in ("add", "sub", "relu") and u.name != self.g.output:
                todo.extend((v, factor) for v in self.users[u.name])
            elif self.cls(u) in ("host", "clip") and u.op in _ACTIVATIONS and u.name != self.g.output:
                # what an activation's input reaches beyond its output's range is not seen: 8x more room (a leaky
                # ReLU's negative inputs reach 1/slope times its outputs)
                slopes = [abs(u.attrs["negative_slope"])] if u.op == "leaky_relu" else \
                    u.params["weight"].abs().tolist() if u.op == "prelu" else []
                room = max([8.0] + [1.0 / v for v in slopes if v > 0])
                todo.extend((v, room * factor) for v in self.users[u.name])
            else:
                top = max(top, self.bounds.get(n.name) or math.inf)
        if not math.isfinite(top) or top <= 0:
            return e
        return max(e - (WEIGHT_BITS - 1), math.ceil(math.log2(4 * top / (scale_in * 2 ** (ACC_BITS - 1)))))

    def _weight_parts(self, w: np.ndarray, spikes) -> list:
        """(polarity, weight matrix or kernel) per process: one analog part, or one per polarity of the input
        site (graded: the weights times the site's step; channels: one copy per threshold channel)."""
        if spikes is None:
            return [("analog", w)]
        parts = []
        bpos, bneg, table, steps = _site_arrays(spikes.site)
        steps = steps / spikes.divisor          # a pooling layer's sums: the average's division
        dy = np.diff(table).astype(np.float64)
        for pol, nb, step, sign in (("pos", bpos.size, steps[0], 1.0), ("neg", bneg.size, steps[1], -1.0)):
            if nb == 0:
                continue
            if self.lowering == "graded":
                parts.append((pol, w * (sign * step)))
            else:                   # channel g of the site is worth (y_g − y_{g−1})·step
                incs = dy[:nb] * step * sign
                parts.append((pol, np.concatenate([w * i for i in incs], axis=1)))
        if not parts:       # a site with no threshold (never calibrated, e.g. a branch that saw no data) never
            parts.append(("pos", np.zeros_like(w)))   # fires: zero synapses keep its consumer's input connected
        return parts

    def _check_synapse(self, n: Node, kind: str, spikes) -> None:
        """What this lowering cannot express: grouped convolutions over channels, analog fixed-point inputs
        of unknown range."""
        x = n.inputs[0]
        if kind == "conv" and self.lowering == "channels" and n.attrs.get("groups", 1) != 1 and spikes is not None:
            raise UserError(f"Lava export: grouped convolution {n.name} with the channel lowering is not supported")
        if spikes is None and self.fixed:
            if x in self.input_like and not self.input_abs_max:
                raise UserError("Lava export (fixed point): the input's range is needed to encode it in "
                                f"{INPUT_BITS} bits; pass --data")
            if not self.bounds.get(x):
                why = self._unbounded(x)
                raise UserError(f"Lava export (fixed point): {n.name} reads an analog value ({x}) whose integer range "
                                f"is not derived ({why}). Use --precision floating_pt")

    def _unbounded(self, x: str) -> str:
        """Why value x has no bound: the first node on its path whose range is not derived."""
        v = self.g[x]
        while True:
            nxt = next((self.g[i] for i in v.inputs if not self.bounds.get(i)), None)
            if nxt is None:
                return f"{v.name} is {v.op}" + (", whose bound is zero" if self.bounds.get(v.name) == 0 else "")
            v = nxt

    def _input_scale(self, parts, e: int, abs_max: float) -> float:
        """Fixed point, analog input (the network input, or a host value with a derived bound abs_max):
        as many input bits as the 24-bit accumulator allows (≥ 8, ≤ 16)."""
        row = max(float(np.abs(quantise(m, e)).reshape(m.shape[0], -1).sum(1).max()) for _, m in parts)
        levels = max(2 ** (INPUT_BITS - 1) - 1, min(2 ** 15 - 1, int((2 ** (ACC_BITS - 1) - 1) // max(row, 1))))
        return 2.0 ** math.ceil(math.log2(abs_max / levels))

    @staticmethod
    def _exponent_groups(parts, per: int):
        """Fixed point with threshold channels: channel increments span two orders of magnitude, more than
        8-bit weights with one exponent hold. Copies sharing an exponent go to one process (stored: only
        their weights, ``copy_ids``; the other copies' synapses are zero), each shifting its sum to the
        layer's smallest exponent (Lava's weight_exp), so all processes add up at the neuron in one unit."""
        exps = {}
        for pol, m in parts:
            for g in range(m.shape[1] // per):
                exps[(pol, g)] = weight_exponent(float(np.abs(m[:, g * per:(g + 1) * per]).max(initial=0)))
        e_min = min(exps.values())
        procs = []
        for pol, m in parts:
            for e_g in sorted({v for (p, _), v in exps.items() if p == pol}):
                ids = [g for g in range(m.shape[1] // per) if exps[(pol, g)] == e_g]
                sub = np.concatenate([m[:, g * per:(g + 1) * per] for g in ids], axis=1)
                procs.append((pol, sub, e_g, e_g - e_min, ids))
        return procs, e_min

    @staticmethod
    def _to_conv_view(blk: Block):
        """Lava's Conv reads (W, H, C): reshape the flat C·H·W spikes and transpose on the way in."""
        if blk.kind != "conv":
            return None
        w, h, c = blk.attrs["input_shape"]
        return ["to_whc", c, h, w]

    @staticmethod
    def _from_conv_view(blk: Block):
        return ["from_whc"] if blk.kind == "conv" else None

    # -- host blocks
    def host_program(self, b: Block, out_node: Node) -> None:
        """Decide the block's input ports (what arrives, how to decode it, its delay) and output ports
        (which value, how to encode it for each consumer), and connect them."""
        g = self.g
        mine = set(b.ir)
        nodes = [n for n in g if n.name in mine]
        consts = sorted({i for n in nodes for i in n.inputs if g[i].op == "constant"})
        inputs, outputs = [], b.attrs.get("outputs", [])     # host outputs other blocks asked for already
        needed = [i for n in nodes for i in n.inputs if i not in mine and g[i].op != "constant"]
        if b.name == "output":
            needed = [out_node.name]
        if b.name == "input":                # the encoder: the network input arrives on in0
            inputs.append({"port": "in0", "value": g.input.name, "decode": "value", "delay": 0,
                           "size": _numel(self.input_shape), "shape": list(g.input.shape)})
        for value in dict.fromkeys(needed):
            inputs.append(self._host_input(b, value, f"in{len(inputs)}"))
        # outputs: every value of the block read outside it
        for n in nodes:
            for user in self.users[n.name]:
                if user.name in mine:
                    continue
                self._host_output(b, n, user, outputs)
        if b.name == "output":
            outputs.append({"port": "hout0", "value": out_node.name, "encode": "value",
                            "size": _numel(out_node.shape), "shape": list(out_node.shape)})
        chip = 0
        for o in outputs:
            if o["port"] is None:
                o["port"] = f"out{chip}"
                chip += 1
        program_nodes = [g[c] for c in consts] + nodes
        for n in program_nodes:
            for k, t in n.params.items():
                b.arrays[f"{n.name}.{k}"] = t.numpy()
        lattice = {v: self.lattice[v] for v in [*needed, *(n.name for n in nodes)] if v in self.lattice}
        b.attrs.update(inputs=inputs, outputs=outputs, constants=consts,
                       nodes=[{"name": n.name, "op": n.op, "inputs": list(n.inputs), "attrs": dict(n.attrs),
                               "params": sorted(n.params), "shape": list(n.shape), "bdim": n.bdim,
                               "source": n.source} for n in program_nodes],
                       lattice=lattice, sites={s: self._site_info(s) for s in set(lattice.values())},
                       ops=sorted({n.op for n in nodes if n.op != "input"}))
        for o in outputs:
            for dst, dst_port, view in o.pop("_conn", []):
                self.connect(b.name, o["port"], dst, dst_port, view)

    def _site_info(self, name: str) -> dict:
        p = self.g[name].params
        return {"steps": p["steps"].double().tolist(), "table": p["table"].tolist(),
                "n_pos": int(p["bounds_pos"].numel()), "n_neg": int(p["bounds_neg"].numel())}

    def _host_input(self, b: Block, value: str, port: str) -> dict:
        g = self.g
        v = g[value]
        c = self.cls(v)
        spec = {"port": port, "value": value, "delay": b.stage - self.stage[value],
                "size": _numel(v.shape), "shape": list(v.shape), "bdim": v.bdim}
        if c == "neuron":
            spec.update(decode="levels", steps=v.params["steps"].double().tolist())
            self.connect(self.block_of[value], "s_out", b.name, port)
        elif c == "synapse":
            bias = _expand_bias(v) if v.params.get("bias") is not None else None
            spec.update(decode="acc", scale=self.acc_scale[value], bias=bias is not None)
            if bias is not None:
                b.arrays[f"{port}.bias"] = bias.astype(np.float32)
            for blk in self.blocks:        # every polarity of the layer sums into the port
                if blk.kind in ("dense", "sparse", "conv") and blk.attrs["layer"] == value:
                    self.connect(blk.name, "a_out", b.name, port, self._from_conv_view(blk))
        else:                              # another host block's value
            lat = self.lattice.get(value)
            spec.update(decode="levels" if lat else "value")
            if lat:
                spec["steps"] = g[lat].params["steps"].double().tolist()
            src = self.by_name[self.block_of[value]]
            src_port = self._find_or_add_host_output(src, value, encode="levels" if lat else "value")
            self.connect(src.name, src_port, b.name, port)
        return spec

    def _find_or_add_host_output(self, src: Block, value: str, encode: str) -> str:
        """Host→host edges created while lowering a later block: the producer's program is already
        written, so append the port to it."""
        outs = src.attrs.setdefault("outputs", [])
        for o in outs:
            if o["value"] == value and o["encode"] == encode:
                return o["port"]
        port = f"hout{sum(o['port'].startswith('hout') for o in outs if o['port'])}"
        outs.append({"port": port, "value": value, "encode": encode, "size": _numel(self.g[value].shape),
                     "to_chip": False, "_conn": []})
        return port

    def _host_output(self, b: Block, n: Node, user: Node, outputs: list) -> None:
        c = self.cls(user)
        lat = self.lattice.get(n.name)
        if c == "host":
            return                          # created by the consumer's _host_input (it runs later, or did)
        if c == "neuron":
            enc = "int" if self.fixed else "value"
            dsts = [(f"sfn_{user.name}", "a_in", None)]
            spec: dict[str, Any] = {"value": n.name, "encode": enc, "neuron": user.name}
        elif user.name in self.relay_heads:     # a residual sum's delayed operand: its relays take the levels
            for pol, head in self.relay_heads[user.name].items():
                blk = self.by_name[head]
                self._append_output(outputs, {"value": n.name, "encode": f"levels_{pol}", "site": lat}, blk,
                                    self._to_conv_view(blk), n)
            return
        else:                               # a synaptic layer
            blks = [blk for blk in self.blocks if blk.kind in ("dense", "sparse", "conv")
                    and blk.attrs["layer"] == user.name]     # every polarity / exponent group of this layer
            for blk in blks:
                pol = blk.attrs["polarity"]
                if pol == "analog":
                    enc = "int" if self.fixed else "value"
                    spec = {"value": n.name, "encode": enc, "scale": blk.attrs["scale"] / 2.0 ** blk.attrs["weight_exp"]
                            if self.fixed else 1.0}
                else:
                    enc = f"{'chan' if self.lowering == 'channels' else 'levels'}_{pol}"
                    spec = {"value": n.name, "encode": enc, "site": lat}
                self._append_output(outputs, spec, blk, self._to_conv_view(blk), n)
            return
        self._append_output(outputs, spec, None, None, n, dsts)

    def _append_output(self, outputs, spec, blk, view, n, dsts=None):
        dsts = dsts or [(blk.name, "s_in", view)]
        for o in outputs:
            if o["value"] == spec["value"] and o["encode"] == spec["encode"] and o.get("neuron") == spec.get("neuron") \
                    and o.get("scale") == spec.get("scale"):       # two layers reading one value at two scales
                o["_conn"].extend(dsts)
                return
        size = _numel(n.shape)
        if spec["encode"].startswith("chan_"):
            site = self.g[spec["site"]]
            nb = site.params["bounds_pos" if spec["encode"].endswith("pos") else "bounds_neg"].numel()
            size *= nb
        outputs.append({**spec, "port": None, "to_chip": True, "size": size, "_conn": list(dsts)})

    def _check_acyclic(self) -> None:
        """Zero-delay edges (everything but a synaptic process's output) must not form a cycle."""
        edges: dict[str, set] = {b.name: set() for b in self.blocks}
        kinds = {b.name: b.kind for b in self.blocks}
        for c in self.conns:
            if kinds[c["src"]] not in ("dense", "sparse", "conv"):
                edges[c["src"]].add(c["dst"])
        state: dict[str, int] = {}

        def visit(a):
            state[a] = 1
            for d in edges[a]:
                if state.get(d) == 1:
                    raise UserError(f"Lava export: blocks {a} and {d} form a zero-delay cycle; not supported")
                if d not in state:
                    visit(d)
            state[a] = 2
        for a in edges:
            if a not in state:
                visit(a)


def _expand_bias(n: Node) -> np.ndarray:
    """The layer's bias per output unit, in the flattened (C·H·W or tokens·features) order."""
    b = n.params["bias"].double().numpy()
    if n.op == "conv2d":
        return np.repeat(b, _numel(n.shape[2:]))
    return np.tile(b, _numel(n.shape[:-1]))          # one sample's rows, wherever its batch axis is


def lower(model, lowering: str = "graded", precision: str = "floating_pt", input_abs_max: float | None = None,
          avg_pool: str = "folded") -> Plan:
    """Plan the Lava processes of a converted model (see the module docstring)."""
    from ...methods import require_single_step
    require_single_step(model, "Lava")        # multi-timestep baselines (if, ecmt) keep state: refused
    low = _Lowering(model.graph, model.input_shape, lowering, precision, input_abs_max, avg_pool=avg_pool)
    return low.lower()


def pool_event_counts(model, levels: dict) -> list[dict]:
    """Synaptic events per sample in the layers after each average pooling of spikes, in the two forms a
    target can give it: ``folded`` (today's lowering: the pooling folded into the next layer's weights,
    each pre-pool spike carrying the pooled position's full fan-out) and ``pooling_layer`` (a layer of
    graded neurons summing each window, one event per pre-pool spike into it, then one event per non-zero
    pooled neuron carrying the fan-out). ``levels``: site -> spike levels (N, ...), e.g. from the reference
    interpreter's ``run_with_levels``. Fan-outs are per input unit away from the borders: a linear layer's
    output count; a convolution's (C_out / groups) · kh · kw / (stride_h · stride_w)."""
    import torch

    from ...ops import apply
    low = _Lowering(model.graph, model.input_shape, "graded", "floating_pt", None)
    low.analyse()
    g, rows = low.g, []
    for name, site in low.folds.items():
        pool = g[name]
        if pool.op not in SUMMING:
            continue
        lv = torch.as_tensor(levels[site]).reshape(-1, *g[site].shape[1:]).double()
        n = lv.shape[0]
        fired = (lv != 0).double()
        pooled = apply(pool, [fired], g, n) > 0
        consumers, todo = [], list(low.users[name])
        while todo:
            u = todo.pop()
            if u.op in ("linear", "conv2d"):
                consumers.append(u)
            else:
                todo.extend(low.users[u.name])
        fan = 0.0
        for u in consumers:
            if u.op == "linear":
                fan += u.shape[-1]
            else:
                a, w = u.attrs, u.params["weight"]
                fan += w.shape[0] / a.get("groups", 1) * w.shape[2] * w.shape[3] / (a["stride"][0] * a["stride"][1])
        pre, post = float(fired.sum()) / n, float(pooled.sum()) / n
        rows.append({"pool": name, "site": site, "consumers": [u.name for u in consumers],
                     "pre_pool_spikes": pre, "pooled_nonzero": post, "fan_out": fan,
                     "folded": pre * fan, "pooling_layer": pre + post * fan,
                     "ratio": pre * fan / max(pre + post * fan, 1e-30)})
    return rows
