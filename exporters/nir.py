"""NIR exporter (SPEC §7): the converted SFN network as a graph of standard NIR primitives.

NIR has no multi-level neuron, so each SFN site of N positive (M negative) boundaries
becomes N + M parallel binary ``nir.Threshold`` channels on the same pre-activation:

* the weight layer in front of the site is emitted with its output rows tiled G = N + M
  times (the M negative copies negated, so those channels see −x); where the site's
  input is not such a layer, a Linear / 1×1 Conv of stacked ±identities fans it out;
* ``nir.Threshold`` is strict (fires at v > θ) while the SFN fires at x ≥ b, so θ is
  ``nextafter(b, −inf)`` in float32: for float32 inputs ``x > θ ⟺ x ≥ b`` exactly;
* channel g's spike is worth the level increment (y_g − y_{g−1})·λθ± (negated for the
  negative branch); ``Σ_g spike_g · inc_g`` is the site's output, so the increments are
  folded into the NEXT weight layer's weights (through average pooling and flatten,
  which are linear and per channel). Where no weight layer follows (a network or region
  output), an explicit Linear / 1×1 Conv recombines them.

Channel layout: the expanded tensor is [G·C, ...] with the copy index outermost, so
after a flatten copy g occupies one contiguous block of features.

Layouts. NIR values are channel-first: (C,), (C, L) or (C, H, W), and NIR's Linear/Affine act
on a 1-D vector. A linear over the last axis of a token tensor (T×C, or A×T×C) is therefore
written as a 1×1 ``Conv1d`` (``Conv2d``) on the channel-first value (C×T, or C×A×T): exact
by NIR's own definitions and type-checked by ``nir.read``. Each value carries a permutation
``perm`` (NIR tensor = host tensor without batch axis, permuted by ``perm``); inside a graph
no transpose is needed because every node keeps the layout of its input.

Only what NIR expresses is exported: input, linear, conv2d (groups 1), SFN sites,
avg_pool2d (no padding), max_pool2d straight after a site (channels are cumulative, so the
pooled level's channel g is the OR of the window's channel g — a SumPool2d and a Threshold;
AND for negative channels), flatten / reshape that merge contiguous axes. Anything else —
max pooling of analog values, layer_norm, softmax, gelu, products of activations, sums of
two tensors, transposes — is refused by :func:`to_nir` with a :class:`UserError` listing
every offending node, or, with :func:`export_nir_partial` (``export --target nir --partial``),
left to the host: the file then holds the largest NIR-expressible regions, each a complete
NIRGraph, and the host remainder is described in the file's metadata (docs/nir.md).

Running the file: no NIR reader maps ``nir.Threshold`` out of the box
(``research/nir-readers.md``), so :func:`nir_node_map` gives nirtorch 2.6 the missing
mappings and :func:`load_nir` returns a torch module computing logits for one timestep;
:func:`load_partial` / :func:`run_partial` run a partial export (regions in nirtorch, host
nodes with the torch reference ops).
"""
from __future__ import annotations

import json
import math
import os
import re
from collections import defaultdict
from dataclasses import dataclass, replace
from typing import cast

import numpy as np
import torch

from ..backends import Simple
from ..clips import neuron_clips
from ..errors import UserError
from ..ir import Graph, Node
from ..model_file import ConvertedModel, atomic_write
from ..passes import input_readers
from ..samples import Rows
from ..untrusted import reason, regular_file

__all__ = ["to_nir", "export_nir", "export_size", "nir_node_map", "load_nir", "check_nir", "to_nir_partial",
           "export_nir_partial", "load_partial", "run_partial", "PARTIAL_FORMAT"]

_F32 = np.float32
_LAYOUT_OK = {"input", "linear", "conv2d", "sfn", "flatten", "reshape", "avg_pool2d", "max_pool2d", "add", "pad"}
PARTIAL_FORMAT = "sfn-deploy/nir-partial"
PARTIAL_VERSION = 1


def _nir():
    import nir  # imported lazily: only this exporter needs it
    return nir


def _single_step(model) -> None:
    """Multi-timestep baselines (stateful if_neuron sites) have no single-step NIR form."""
    try:
        from ..methods import require_single_step
    except ImportError:             # pragma: no cover - older trees without methods.py
        return
    require_single_step(model, "NIR")


# -- what NIR can express ---------------------------------------------------------------------------------

def _rank(node: Node) -> int:
    """Number of axes of one sample (the batch axis removed)."""
    return len(node.shape) - 1


def _merge_range(node: Node, graph: Graph) -> tuple[int, int] | None:
    """For a flatten / reshape that only merges contiguous axes of one sample (batch axis first and
    untouched): the merged range (start, end) in per-sample axes, NIR Flatten's convention. Else None."""
    src = graph[node.inputs[0]]
    if src.bdim != 0 or node.bdim != 0:
        return None
    a, b = [int(s) for s in src.shape[1:]], [int(s) for s in node.shape[1:]]
    if node.op == "flatten":
        r = len(src.shape)
        s, e = (int(node.attrs[k]) % r if r else 0 for k in ("start", "end"))
        return (s - 1, e - 1) if 1 <= s <= e else None
    shape = node.attrs.get("shape") or []
    if not shape or shape[0] != "B" or any(isinstance(s, str) for s in shape[1:]):
        return None
    for s in range(len(a)):
        for e in range(s, len(a)):
            if a[:s] + [int(np.prod(a[s:e + 1]))] + a[e + 1:] == b:
                return s, e
    return None


_HOST_WHY = {
    "softmax": "softmax (exponentials normalised over a row): no NIR primitive",
    "log_softmax": "log-softmax (log-probabilities normalised over a row): no NIR primitive",
    "layer_norm": "LayerNorm (per-sample mean and variance): no NIR primitive",
    "batch_norm": "unfolded BatchNorm: not lowered by the NIR exporter",
    "gelu": "GELU nonlinearity: no NIR primitive (only threshold neurons)",
    "relu": "ReLU outside an SFN site: no NIR primitive",
    "matmul": "product of two activations (attention): NIR weights are fixed parameters",
    "add": "sum with another tensor or a constant (residual, bias of data): not lowered by the NIR exporter",
    "sub": "difference of tensors: not lowered by the NIR exporter",
    "mul": "elementwise product or scaling: not lowered by the NIR exporter",
    "div": "division: no NIR primitive",
    "constant": "a stored data tensor (class token, position embedding): no NIR primitive",
    "transpose": "axis permutation: NIR has no transpose",
    "permute": "axis permutation: NIR has no transpose",
    "select": "picks part of a tensor: no NIR primitive",
    "slice": "picks part of a tensor: no NIR primitive",
    "cat": "concatenation: no NIR primitive",
    "expand": "broadcast: no NIR primitive",
    "unsqueeze": "inserts an axis: no NIR primitive",
    "squeeze": "removes an axis: no NIR primitive",
    "adaptive_avg_pool2d": "adaptive average pooling: not lowered by the NIR exporter",
    "mean": "mean over axes: not lowered by the NIR exporter",
}


def _sole_user(node: Node, graph: Graph) -> Node | None:
    users = graph.users()[node.name]
    return users[0] if len(users) == 1 else None


def _offset(node: Node, graph: Graph) -> bool:
    """A constant added to the value that one SFN site alone reads, directly or through a padding by that
    constant (the input neuron's offset and moved padding, sfn_deploy/passes.py offset_input): the bias and
    padding of that site's fan-out layer."""
    if len(node.inputs) != 1 or node.attrs.get("alpha", 1) != 1 or not math.isfinite(node.attrs.get("other", math.inf)):
        return False
    u = _sole_user(node, graph)
    return u is not None and (u.op == "sfn" or (u.op == "pad" and _moved_padding(u, node, graph)))


def _moved_padding(pad: Node, offset: Node, graph: Graph) -> bool:
    """A constant padding of the last two axes by the offset's constant, read by one SFN site alone: a padded
    fan-out reads x = 0 there, as the padding of x − low by −low gives."""
    a = pad.attrs
    u = _sole_user(pad, graph)
    return (a.get("mode", "constant") == "constant" and len(a["pad"]) == 4 and min(a["pad"]) >= 0
            and a["pad"][0] == a["pad"][1] and a["pad"][2] == a["pad"][3]
            and a.get("value", 0.0) == offset.attrs.get("other") and u is not None and u.op == "sfn")


def _pending(node: Node, x: _Value) -> _Value:
    """An offset (:func:`_offset`) or moved padding (:func:`_moved_padding`) carried to the site's fan-out layer."""
    a = node.attrs
    if node.op == "add":
        return replace(x, offset=x.offset + float(a["other"]))
    return replace(x, padding=(int(a["pad"][2]), int(a["pad"][0])))


def _problem(node: Node, graph: Graph) -> str | None:
    """Why NIR cannot express this node, whatever its neighbours (None when it can)."""
    op, a = node.op, node.attrs
    if op == "max_pool2d":
        if graph[node.inputs[0]].op != "sfn":
            return "max pooling of analog values: NIR has no max-pool primitive (only spikes straight from an " \
                   "SFN site are pooled, as OR/AND of threshold channels)"
        if any(a.get("padding", [0])) or a.get("ceil_mode") or any(d != 1 for d in a.get("dilation", [1])):
            return "max pooling with padding, dilation or ceil_mode"
    if op not in _LAYOUT_OK:
        return _HOST_WHY.get(op, "no NIR primitive expresses it")
    if op == "add" and not _offset(node, graph):
        return _HOST_WHY["add"]
    if op == "pad" and not (graph[node.inputs[0]].op == "add" and _offset(graph[node.inputs[0]], graph)):
        return "padding: no NIR primitive (only the input neuron's moved padding, as its fan-out layer's)"
    if node.bdim != 0:
        return "batch axis is not the first axis"
    if op == "conv2d" and a.get("groups", 1) != 1:
        return ("grouped convolution: NIR's Conv2d types its input as weight.shape[1] = C/groups channels, so "
                "nir.read refuses the file (NIR 1.0.8)")
    if op == "avg_pool2d" and (any(a.get("padding", [0])) or a.get("ceil_mode") or a.get("divisor_override")):
        return "average pooling with padding, ceil_mode or divisor_override"
    if op in ("flatten", "reshape") and _merge_range(node, graph) is None:
        return "only a flatten of contiguous axes (batch axis untouched) maps to NIR Flatten"
    if op in ("linear", "sfn") and not 1 <= _rank(node) <= 3:
        return f"a {_rank(node)}-axis value: NIR expresses 1 to 3 axes here (Linear, 1×1 Conv1d, 1×1 Conv2d)"
    if op == "sfn" and node.params["bounds_pos"].numel() + node.params["bounds_neg"].numel() == 0:
        return "SFN site without boundaries"
    return None


# -- which nodes go to NIR, in which layout, in which region ----------------------------------------------

_ID, _LF = "id", "lf"
_LAYOUT_WORDS = {_ID: "the host axis order", _LF: "channel-first order (last axis first)"}
_PRIORITY = {"linear": 0, "conv2d": 0, "avg_pool2d": 1, "max_pool2d": 1, "flatten": 2, "reshape": 2}


def _perm(rank: int, layout: str) -> tuple:
    return tuple(range(rank)) if layout == _ID or rank < 2 else (rank - 1,) + tuple(range(rank - 1))


@dataclass
class _Piece:
    nodes: list          # IR node names, graph order
    src: str             # the value it reads (network input, a host value or another region's output)
    out: str             # the one value it gives back


class _Plan:
    """Splits the graph into NIR-expressible nodes (with the layout of every value) and host nodes.

    ``partial=False``: one region with every node (``host`` lists what blocks a full export).
    ``partial=True``: regions are the connected parts of NIR-expressible nodes, cut so that each
    has one input and one output (every NIR node has one input, so a connected part is a tree
    fed by one value; it is cut where values leave it on two paths). Nodes NIR cannot express in
    their context (a layout two neighbours disagree on, max pooling whose site fell in another
    region, an unused value) move to the host too, and the plan is redone until it is stable."""

    def __init__(self, graph: Graph, partial: bool):
        self.graph, self.partial = graph, partial
        self.order = {n.name: i for i, n in enumerate(graph)}
        self.host: dict[str, str] = {}
        users = graph.users()
        # a clip to [0, c] read by one site fuses into that site's thresholds (sfn_deploy/clips.py)
        self.clips = {k: c for k, c in neuron_clips(graph, users).items() if len(users[k]) == 1}
        for n in graph:
            if n.op != "input" and n.name not in self.clips and (why := _problem(n, graph)):
                self.host[n.name] = why
        if partial:
            live, stack = set(), [graph.output]
            while stack:
                v = stack.pop()
                if v not in live:
                    live.add(v)
                    stack.extend(graph[v].inputs)
            for n in graph:
                if n.name not in live and n.op != "input":
                    self.host.setdefault(n.name, "its value is never used")
        while True:
            before = len(self.host)
            self._layouts()
            for n in self.members():
                if n.op == "max_pool2d" and n.inputs[0] in self.host:
                    self.host[n.name] = f"max pooling of spikes whose site {n.inputs[0]} runs on the host"
                if n.op in ("add", "pad") and users[n.name][0].name in self.host:
                    self.host[n.name] = f"the input offset of {users[n.name][0].name}, which runs on the host"
                clip_site = users[n.name][0].name if n.name in self.clips else None
                if clip_site is not None and (clip_site in self.host or n.inputs[0] in self.host):
                    self.host[n.name] = f"a clip whose layer or site {clip_site} runs on the host"
            if partial and len(self.host) == before:
                self._regions()
            if len(self.host) == before:
                break
        self.host = {k: self.host[k] for k in sorted(self.host, key=self.order.__getitem__)}

    def members(self) -> list[Node]:
        return [n for n in self.graph if n.op != "input" and n.name not in self.host]

    def _layouts(self) -> None:
        """Choose one layout per group of values that must share it; a node whose need loses is left to the host."""
        g = self.graph
        parent: dict[str, str] = {}

        def find(v):
            while parent.get(v, v) != v:
                v = parent[v]
            return v
        for n in self.members():
            if n.op in ("sfn", "add", "pad") or n.name in self.clips:   # input and output share a layout
                parent[find(n.name)] = find(n.inputs[0])
        chosen = {}
        for root, rs in self._layout_requests(find).items():
            keep = min(rs)
            chosen[root] = keep[2]
            for _p, _o, want, name, v in rs:
                if want != keep[2] and name:
                    who = keep[3] or "the network boundary"
                    self.host[name] = (f"needs value {v} in {_LAYOUT_WORDS[want]}, but {who} needs it in "
                                       f"{_LAYOUT_WORDS[keep[2]]}: NIR has no transpose")
        self.layout = {n.name: _perm(_rank(n), chosen.get(find(n.name), _ID)) for n in g}

    def _layout_requests(self, find) -> dict[str, list]:
        """Per layout group: (priority, order, layout, node, value) of every node that needs a layout there."""
        g = self.graph
        reqs: dict[str, list] = defaultdict(list)
        for n in self.members():
            u = n.inputs[0]
            if n.op == "linear" and _rank(g[u]) >= 2:
                want = _LF                          # a linear over the last axis = 1×1 conv, channel-first
            elif n.op in _PRIORITY:
                want = _ID
            else:
                continue
            for v in (u, n.name):
                if _rank(g[v]) >= 2:
                    reqs[find(v)].append((_PRIORITY[n.op], self.order[n.name], want, n.name, v))
        if not self.partial:                        # a full export keeps the network's own input/output
            for v in (g.input.name, g.output):
                if _rank(g[v]) >= 2:
                    reqs[find(v)].append((-1, -1, _ID, "", v))
        return reqs

    def _regions(self) -> None:
        g = self.graph
        members = self.members()
        mset = {n.name for n in members}
        users = g.users()
        children: dict[str, list[str]] = defaultdict(list)
        roots: list[str] = []
        for n in members:
            (children[n.inputs[0]] if n.inputs[0] in mset else roots).append(n.name)
        external = {v: v == g.output or any(u.name not in mset for u in users[v]) for v in mset}
        exits: dict[str, int] = {}
        for n in reversed(members):
            exits[n.name] = int(external[n.name]) + sum(exits[c] for c in children[n.name])
        self.pieces: list[_Piece] = []

        def split(root, src):
            nodes, v = [], root
            while True:
                nodes.append(v)
                live = [c for c in children[v] if exits[c]]
                if (external[v] and live) or len(live) != 1:
                    self.pieces.append(_Piece(sorted(nodes, key=self.order.__getitem__), src, v))
                    for c in live:
                        split(c, v)
                    return
                v = live[0]
        for r in roots:
            split(r, g[r].inputs[0])
        self.pieces.sort(key=lambda p: self.order[p.nodes[0]])
        piece_of = {name: i for i, p in enumerate(self.pieces) for name in p.nodes}
        for n in members:
            if n.op == "max_pool2d" and piece_of[n.name] != piece_of[n.inputs[0]]:
                self.host[n.name] = (f"max pooling of spikes whose site {n.inputs[0]} ends another NIR region "
                                     f"(a region boundary carries values, not threshold channels)")

    def nir_shape(self, v: str) -> tuple:
        s = self.graph[v].shape[1:]
        return tuple(int(s[i]) for i in self.layout[v])


def check_nir(graph: Graph) -> None:
    """Raise a one-line UserError naming what NIR cannot express, by operation."""
    _full_plan(graph)


def nir_host_nodes(graph: Graph) -> dict[str, str]:
    """{node: why} for every node a full NIR export cannot express (empty: NIR holds the whole network)."""
    return _Plan(graph, partial=False).host


def _full_plan(graph: Graph) -> _Plan:
    """The plan of a full export, or check_nir's UserError."""
    plan = _Plan(graph, partial=False)
    if plan.host:
        by_op: dict[str, list[str]] = {}
        for name in plan.host:
            by_op.setdefault(graph[name].op, []).append(name)
        what = "; ".join(f"{op} ×{len(names)} (e.g. {names[0]}: {plan.host[names[0]]})" for op, names in by_op.items())
        raise UserError(f"NIR export refused: {len(plan.host)} node(s) NIR cannot express: {what}; export --partial "
                        "writes the NIR-expressible regions and leaves these to the host (with --json it lists every "
                        "node and why)")
    return plan


# -- lowering ---------------------------------------------------------------------------------------------

@dataclass
class _Value:
    """A lowered value: its NIR node, its NIR shape (no batch) and, for expanded spikes, the
    increment of each copy (the real value is Σ_g copy_g · inc[g]; ``base`` its unexpanded shape)."""
    node: str
    shape: tuple
    inc: np.ndarray | None = None
    base: tuple | None = None
    offset: float = 0.0             # a constant still to add (the input neuron's offset: its fan-out's bias)
    padding: tuple = (0, 0)         # a padding still to apply (the input neuron's: its fan-out's)


def _site_channels(site: Node, clip: float | None = None):
    """(float32 thresholds θ, float64 increments, signs) of the G binary channels of one SFN site (with ``clip``:
    of the positive boundaries up to it only, the site then reading the unclipped value)."""
    p = site.params
    table = p["table"].double().numpy()
    steps = p["steps"].double().numpy()
    bpos, bneg = p["bounds_pos"].numpy().astype(_F32), p["bounds_neg"].numpy().astype(_F32)
    if clip is not None:
        bpos = bpos[bpos <= _F32(clip)]
    dy = np.diff(table)
    theta = np.concatenate([np.nextafter(bpos, _F32(-np.inf)), np.nextafter(bneg, _F32(-np.inf))]).astype(_F32)
    inc = np.concatenate([dy[:bpos.size] * steps[0], -dy[:bneg.size] * steps[1]])
    sign = np.concatenate([np.ones(bpos.size), -np.ones(bneg.size)])
    return theta, inc, sign


def _merge(shape: tuple, s: int, e: int) -> tuple:
    return tuple(shape[:s]) + (int(np.prod(shape[s:e + 1])),) + tuple(shape[e + 1:])


class _Lowering:
    """Lowers one region: ``nodes`` (graph order) fed by the value ``src`` (NIR shape ``in_shape``),
    giving back ``outputs``; values are laid out as ``plan.layout`` says."""

    def __init__(self, graph: Graph, plan: _Plan, nodes, src: str, outputs: list[str], in_shape):
        self.nir = _nir()
        self.graph, self.plan, self.users = graph, plan, graph.users()
        self.members = set(nodes)
        self.order = [n for n in graph if n.name in self.members]
        self.src, self.outputs = src, list(outputs)
        self.nodes: dict = {}
        self.edges: list = []
        self.env: dict[str, _Value] = {}
        self.sites: dict[str, dict] = {}
        self.input_shape = tuple(int(s) for s in in_shape)

    def add(self, name: str, nir_node, src: str | None) -> str:
        base, k = name, 1
        while name in self.nodes:
            k += 1
            name = f"{base}_{k}"
        self.nodes[name] = nir_node
        if src is not None:
            self.edges.append((src, name))
        return name

    # a synaptic layer: fold the increments of an expanded input, optionally tile rows for a following site
    def weight_layer(self, name, kind, w, b, attrs, x: _Value, site: Node | None, out_shape: tuple,
                     clip: float | None = None) -> _Value:
        w64 = w.astype(np.float64)
        inc = theta = None
        sign = np.ones(1)
        if site is not None:                # one copy of the rows per channel, negated for the negative branch
            theta, inc, sign = _site_channels(site, clip)
            b = None if b is None else np.concatenate([b * s for s in sign])
        # fold Σ_g copy_g·inc_g of an expanded input into the columns (copy index outermost); each block is
        # computed in float64 and rounded once into the float32 result (no float64 copy of the whole tiling)
        gains = [None] if x.inc is None else list(x.inc)
        o, c = w64.shape[:2]
        w = np.empty((len(sign) * o, len(gains) * c) + w64.shape[2:], _F32)
        for i, sg in enumerate(sign):
            for j, g in enumerate(gains):
                w[i * o:(i + 1) * o, j * c:(j + 1) * c] = (w64 if g is None else w64 * g) * sg
        nir = self.nir
        bias = np.zeros(w.shape[0], _F32) if b is None else b.astype(_F32)
        if kind == "linear":
            node = nir.Linear(weight=w) if b is None else nir.Affine(weight=w, bias=bias)
        elif kind == "conv1d":
            node = nir.Conv1d(input_shape=int(x.shape[1]), weight=w, stride=int(attrs["stride"][0]),
                              padding=int(attrs["padding"][0]), dilation=int(attrs["dilation"][0]), groups=1,
                              bias=bias)
        else:
            node = nir.Conv2d(input_shape=tuple(x.shape[1:]), weight=w, stride=tuple(attrs["stride"]),
                              padding=tuple(attrs["padding"]), dilation=tuple(attrs["dilation"]), groups=1,
                              bias=bias)
        n = self.add(name, node, x.node)
        if site is None or inc is None or theta is None:
            return _Value(n, tuple(out_shape))
        shape = (len(inc) * out_shape[0],) + tuple(out_shape[1:])
        th = np.broadcast_to(np.repeat(theta, out_shape[0]).reshape((-1,) + (1,) * (len(shape) - 1)), shape)
        t = self.add(site.name, nir.Threshold(threshold=np.ascontiguousarray(th, _F32)), n)
        self.sites[site.name] = {"threshold": t, "channels": int(len(inc)),
                                 "positive": int(site.params["bounds_pos"].numel()),
                                 "perm": list(self.plan.layout[site.name])}
        return _Value(t, shape, inc, tuple(out_shape))

    @staticmethod
    def _pointwise(rank: int):
        """(kind, attrs) of a per-position (1×1) weight layer on a channel-first value of this rank."""
        if rank == 1:
            return "linear", {}
        if rank in (2, 3):
            one = [1] * (rank - 1)
            return ("conv1d" if rank == 2 else "conv2d"), {"stride": one, "padding": [0] * (rank - 1),
                                                           "dilation": one}
        raise UserError(f"NIR export: a {rank}-axis value; only 1 to 3 axes are supported")

    def identity(self, name, x: _Value, site: Node | None) -> _Value:
        """Fan-out (site given) or recombination (site None) as a Linear / 1×1 Conv of identities."""
        base = tuple(x.base or x.shape)
        c = base[0]
        kind, attrs = self._pointwise(len(base))
        w = np.eye(c).reshape((c, c) + (1,) * (len(base) - 1))
        if any(x.padding):              # the input neuron's moved padding: a padded 1×1 convolution
            ph, pw = x.padding
            attrs = {**attrs, "padding": [ph, pw]}
            base = (c, base[1] + 2 * ph, base[2] + 2 * pw)
        return self.weight_layer(name, kind, w, np.full(c, x.offset) if x.offset else None, attrs, x, site, base)

    def max_pool(self, node: Node, x: _Value) -> _Value:
        """Max pooling of threshold channels: the pooled level reaches g iff some input in the window does
        (OR: window sum > 0.5) and falls to −j iff every input does (AND: window sum > K − 0.5), since the
        channels of a level are cumulative. A SumPool2d and a Threshold per channel, exact."""
        a, nir = node.attrs, self.nir
        if x.inc is None:
            raise UserError(f"NIR export: {node.name} max-pools values that are not threshold channels")
        k = tuple(a["kernel_size"])
        st = tuple(a["stride"]) if a.get("stride") else k
        c = x.shape[0]
        oh, ow = self.plan.nir_shape(node.name)[1:]
        n = self.add(node.name, nir.SumPool2d(kernel_size=np.array(k), stride=np.array(st),
                                              padding=np.array([0, 0])), x.node)
        per = c // len(x.inc)                       # channels of one copy
        assert x.base is not None                   # expanded values keep their unexpanded shape
        window = k[0] * k[1]
        theta = np.where(x.inc > 0, 0.5, window - 0.5).astype(_F32)   # positive copies OR, negative copies AND
        th = np.broadcast_to(np.repeat(theta, per).reshape(-1, 1, 1), (c, oh, ow))
        t = self.add(node.name + "_any", nir.Threshold(threshold=np.ascontiguousarray(th, _F32)), n)
        return _Value(t, (c, oh, ow), x.inc, (x.base[0], oh, ow))

    def lower(self) -> None:
        nir, g = self.nir, self.graph
        n = self.input_name = self.add("input", nir.Input(input_type={"input": np.array(self.input_shape)}), None)
        self.env[self.src] = _Value(n, self.input_shape)
        self.output_names: dict[str, str] = {}
        fused: set[str] = set()
        for node in self.order:
            if node.name in fused:
                continue
            x = self.env[node.inputs[0]]
            op, p, a = node.op, node.params, node.attrs
            if op in ("linear", "conv2d"):
                users = self.users[node.name]
                clip = None
                if len(users) == 1 and users[0].name in self.plan.clips and users[0].name in self.members:
                    fused.add(users[0].name)            # the clip: the site keeps its thresholds up to it
                    clip = self.plan.clips[users[0].name]
                    users = self.users[users[0].name]
                site = users[0] if (len(users) == 1 and users[0].op == "sfn" and users[0].name in self.members
                                    and node.name not in self.outputs) else None
                w = p["weight"].double().numpy()
                b = p["bias"].double().numpy() if p.get("bias") is not None else None
                if op == "linear":
                    kind, attrs = self._pointwise(_rank(node))
                    w = w.reshape(w.shape + (1,) * (_rank(node) - 1))
                else:
                    kind, attrs = "conv2d", a
                out_shape = self.plan.nir_shape(node.name)
                self.env[(site or node).name] = self.weight_layer(node.name, kind, w, b, attrs, x, site, out_shape,
                                                                  clip)
                if site is not None:
                    fused.add(site.name)
            elif op in ("add", "pad"):          # the input neuron's offset and padding: its fan-out's below
                self.env[node.name] = _pending(node, x)
            elif op == "sfn":
                if x.inc is not None:           # spikes straight into another site: recombine first
                    x = self.identity(node.name + "_recombine", x, None)
                self.env[node.name] = self.identity(node.name + "_fanout", x, node)
            elif op == "avg_pool2d":
                k = tuple(a["kernel_size"])
                st = tuple(a["stride"]) if a.get("stride") else k
                n = self.add(node.name, nir.AvgPool2d(kernel_size=np.array(k), stride=np.array(st),
                                                      padding=np.array([0, 0])), x.node)
                oh, ow = self.plan.nir_shape(node.name)[1:]
                base = None if x.base is None else (x.base[0], oh, ow)
                self.env[node.name] = _Value(n, (x.shape[0], oh, ow), x.inc, base)
            elif op == "max_pool2d":
                self.env[node.name] = self.max_pool(node, x)
            elif op in ("flatten", "reshape"):
                merged = _merge_range(node, g)
                assert merged is not None, node.name        # the plan admits mergeable reshapes only
                s, e = merged
                n = self.add(node.name, nir.Flatten(input_type={"input": np.array(x.shape)}, start_dim=s,
                                                    end_dim=e), x.node)
                base = None if x.base is None else _merge(x.base, s, e)
                self.env[node.name] = _Value(n, _merge(x.shape, s, e), x.inc, base)
            else:                               # the plan keeps such nodes out
                raise UserError(f"NIR export: node {node.name} ({op}) cannot be expressed")
        for v in self.outputs:
            out = self.env[v]
            if out.inc is not None:
                out = self.identity(v + "_recombine", out, None)
            name = "output" if len(self.outputs) == 1 else f"output_{v}"
            self.output_names[v] = self.add(name, nir.Output(output_type={"output": np.array(out.shape)}), out.node)


DEFAULT_MAX_BYTES = 3 * 2 ** 29    # 1.5 GiB of arrays (tiled weights, thresholds): the export peaks at about 3–4× that


def estimate_bytes(graph: Graph, plan: _Plan, nodes, outputs) -> int:
    """The bytes of the float32 arrays the lowering of ``nodes`` will hold, computed from shapes alone.

    Each SFN site becomes G = N + M binary channels: the weight layer in front has its rows tiled G
    times and the one after its columns (G_in · G_out copies of the weights in all), every channel has
    a threshold per position, and a site with no weight layer in front gets a C×C·G identity fan-out."""
    members, users = set(nodes), graph.users()
    mult: dict[str, int] = {}             # value -> channels per element (0: not expanded)
    total, fused = 0, set()

    def channels(site: Node) -> int:
        return int(site.params["bounds_pos"].numel() + site.params["bounds_neg"].numel())

    for node in graph.nodes:
        if node.name not in members or node.name in fused:
            continue
        gin = mult.get(node.inputs[0], 0) if node.inputs else 0
        size = _numel(node.shape[1:])
        if node.op in ("linear", "conv2d"):
            us = users[node.name]
            site = us[0] if len(us) == 1 and us[0].op == "sfn" and us[0].name in members \
                and node.name not in outputs else None
            gout = channels(site) if site is not None else 0
            total += 4 * node.params["weight"].numel() * max(gin, 1) * max(gout, 1) + 4 * size * max(gout, 1)
            if site is not None:
                fused.add(site.name)
                mult[site.name] = gout
        elif node.op == "sfn":
            c = plan.nir_shape(node.name)[0]
            g = channels(node)
            total += 4 * c * c * (g + gin) + 4 * size * g
            mult[node.name] = g
        else:
            mult[node.name] = gin
            if node.op == "max_pool2d":
                total += 4 * size * max(gin, 1)
    for v in outputs:
        if mult.get(v):
            c = plan.nir_shape(v)[0]
            total += 4 * c * c * mult[v]
    return int(total)


def export_size(model: ConvertedModel, partial: bool = False) -> int:
    """Bytes of the arrays :func:`to_nir` (or :func:`to_nir_partial`) would build, without building them."""
    g = model.graph
    if partial:
        plan = _Plan(g, partial=True)
        return sum(estimate_bytes(g, plan, p.nodes, [p.out]) for p in plan.pieces)
    plan = _full_plan(g)
    return estimate_bytes(g, plan, [n.name for n in plan.members()], [g.output])


def _check_size(need: int, max_bytes: int | None, what: str) -> None:
    limit = DEFAULT_MAX_BYTES if max_bytes is None else max_bytes
    if need > limit:
        raise UserError(f"{what} would hold about {need / 2 ** 30:.1f} GiB of tiled weights and thresholds (each "
                        f"SFN level is a binary NIR channel), over the {limit / 2 ** 30:.1f} GiB limit; raise it "
                        "with --max-size GIB, or convert with fewer --levels")


def to_nir(model: ConvertedModel, max_bytes: int | None = None):
    """The converted network as a ``nir.NIRGraph`` of standard primitives (see the module docstring);
    refused before any array is built when it would exceed ``max_bytes`` (:func:`estimate_bytes`)."""
    _single_step(model)
    g = model.graph
    plan = _full_plan(g)
    _check_size(export_size(model), max_bytes, "the NIR export")
    low = _Lowering(g, plan, [n.name for n in plan.members()], g.input.name, [g.output], model.input_shape)
    low.lower()
    return low.nir.NIRGraph(nodes=low.nodes, edges=low.edges, type_check=False, metadata=data_metadata(model))


def data_metadata(model: ConvertedModel) -> dict:
    """What a NIR file says about its input (docs/data.md): the preprocessing that turns images into it and
    the class of each output, and for a model that returned several tensors their shapes (the output is their
    per-sample flattened concatenation), as JSON text (``null``: not recorded)."""
    pre = None if model.preprocessing is None else model.preprocessing.to_dict()
    return {"sfn_deploy_preprocessing": json.dumps(pre), "sfn_deploy_classes": json.dumps(model.classes),
            "sfn_deploy_output_parts": json.dumps(model.graph.output_parts)}


# -- partial export: NIR regions + host remainder -----------------------------------------------------------

_SAFE_KEY = re.compile(r"[A-Za-z0-9_.\-]+")


def _inverse(perm) -> list:
    return [int(i) for i in np.argsort(np.asarray(perm, dtype=np.int64))] if len(perm) else []


def to_nir_partial(model: ConvertedModel, max_bytes: int | None = None):
    """(container NIRGraph, description): the largest NIR-expressible regions of the network, each a
    complete NIRGraph node of the container (its own Input → … → Output), and the host remainder.

    The container's top level links the regions as far as NIR can: a top-level ``Input`` per value a
    region reads from the host (``input`` for the network input, ``input_<value>`` otherwise), an edge
    region → region where one reads the other's output directly, and a top-level ``Output`` per region
    output the host (or the network output) reads. Its ``metadata`` holds the pipeline — regions and
    host nodes in execution order, with every boundary's shape and axis permutation — as JSON text under
    ``pipeline`` and the host nodes' parameters as arrays under ``host_params`` (docs/nir.md)."""
    _single_step(model)
    nir = _nir()
    g = model.graph
    plan = _Plan(g, partial=True)
    if not plan.pieces:
        raise UserError("NIR partial export: no node of the network is NIR-expressible (nothing to write)")
    _check_size(export_size(model, partial=True), max_bytes, "the NIR partial export")
    users = g.users()
    names = [f"region_{k}" for k in range(len(plan.pieces))]
    out_region = {p.out: names[k] for k, p in enumerate(plan.pieces)}
    piece_of = {name: names[k] for k, p in enumerate(plan.pieces) for name in p.nodes}
    readers = defaultdict(list)                     # value -> regions that read it
    for k, p in enumerate(plan.pieces):
        readers[p.src].append(names[k])

    def boundary(v):
        return {"value": v, "shape": [int(s) for s in g[v].shape[1:]],
                "nir_shape": [int(s) for s in plan.nir_shape(v)], "perm": [int(i) for i in plan.layout[v]]}

    top_nodes: dict = {}
    top_edges: list = []
    regions: list = []
    nir_prims: list = []
    total_nodes = total_edges = 0
    in_nodes: dict[str, str] = {}
    for k, p in enumerate(plan.pieces):
        name = names[k]
        low = _Lowering(g, plan, p.nodes, p.src, [p.out], plan.nir_shape(p.src))
        low.lower()
        src_from = ("network input" if g[p.src].op == "input" else out_region.get(p.src, "host"))
        to = [u.name if u.name in plan.host else piece_of[u.name] for u in users[p.out] if u.name not in p.nodes]
        to = list(dict.fromkeys(to + (["network output"] if p.out == g.output else [])))
        desc = {"name": name, "nodes": list(p.nodes),
                "inputs": [{"node": low.input_name, "from": src_from, **boundary(p.src)}],
                "outputs": [{"node": low.output_names[p.out], "to": to, **boundary(p.out)}], "sites": low.sites}
        sub = nir.NIRGraph(nodes=low.nodes, edges=low.edges, type_check=False,
                           metadata={"sfn_deploy_region": json.dumps({k2: desc[k2] for k2 in ("inputs", "outputs",
                                                                                              "nodes", "sites")})})
        regions.append(desc)
        total_nodes += len(low.nodes)
        total_edges += len(low.edges)
        nir_prims.extend(low.nodes.values())
        top_nodes[name] = sub
    for k, p in enumerate(plan.pieces):             # top level: what NIR itself can say about the links
        if p.src in out_region:
            top_edges.append((out_region[p.src], names[k]))
        else:
            if p.src not in in_nodes:
                base = "input" if g[p.src].op == "input" else f"input_{p.src}"
                in_nodes[p.src] = _fresh(base, top_nodes)
                top_nodes[in_nodes[p.src]] = nir.Input(input_type={"input": np.array(plan.nir_shape(p.src))})
            top_edges.append((in_nodes[p.src], names[k]))
        if p.out == g.output or any(u.name in plan.host for u in users[p.out]):
            o = _fresh("output" if p.out == g.output else f"output_{p.out}", top_nodes)
            top_nodes[o] = nir.Output(output_type={"output": np.array(plan.nir_shape(p.out))})
            top_edges.append((names[k], o))
    host, params = [], {}
    for i, (hname, why) in enumerate(plan.host.items()):
        n = g[hname]
        key = None
        if n.params:
            key = hname if _SAFE_KEY.fullmatch(hname) else f"node_{i}"
            params[key] = {pk: pv.detach().cpu().numpy() for pk, pv in n.params.items()}
        host.append({"name": hname, "op": n.op, "inputs": list(n.inputs), "attrs": n.attrs,
                     "shape": [int(s) for s in n.shape], "bdim": n.bdim, "why": why, "params": key,
                     "reads": [f"{out_region[v]}:{v}" for v in n.inputs if v in out_region],
                     "feeds": list(readers.get(hname, []))})
    first = {p.nodes[0]: names[k] for k, p in enumerate(plan.pieces)}
    steps = [["host", n.name] if n.name in plan.host else ["region", first[n.name]]
             for n in g if n.name in plan.host or n.name in first]
    spec = {"format": PARTIAL_FORMAT, "version": PARTIAL_VERSION, "input": g.input.name,
            "input_shape": [int(s) for s in model.input_shape], "output": g.output, "steps": steps,
            "regions": regions, "host_nodes": host,
            "values": {n.name: {"op": n.op, "inputs": list(n.inputs), "shape": [int(s) for s in n.shape],
                                "bdim": n.bdim} for n in g}}
    meta = {"format": PARTIAL_FORMAT, "version": PARTIAL_VERSION,
            "pipeline": json.dumps(spec, default=_jsonable), "host_params": params, **data_metadata(model)}
    top = nir.NIRGraph(nodes=top_nodes, edges=top_edges, metadata=meta, type_check=False)
    in_regions = [name for p in plan.pieces for name in p.nodes]
    info = {"partial": True, "nodes": total_nodes, "edges": total_edges,
            "sites": sum(len(r["sites"]) for r in regions), "sites_total": len(model.sites),
            "graph_nodes": sum(1 for n in g if n.op != "input"), "nodes_in_nir": len(in_regions),
            "nodes_on_host": len(host), **_counts(g, set(in_regions), nir_prims),
            "regions": [{k2: r[k2] for k2 in ("name", "nodes", "inputs", "outputs")} | {"sites": list(r["sites"])}
                        for r in regions],
            "host_nodes": [{k2: h[k2] for k2 in ("name", "op", "inputs", "shape", "bdim", "attrs", "why", "reads",
                                                 "feeds")}
                           for h in host]}
    return top, info


def _fresh(base: str, taken) -> str:
    name, k = base, 1
    while name in taken:
        k += 1
        name = f"{base}_{k}"
    return name


def _jsonable(o):
    if hasattr(o, "tolist"):
        return o.tolist()
    return str(o)


def export_nir_partial(model: ConvertedModel, path: str, max_bytes: int | None = None) -> dict:
    """Write the partial export (:func:`to_nir_partial`) atomically; return its summary."""
    nir = _nir()
    g, info = to_nir_partial(model, max_bytes)
    atomic_write(path, lambda tmp: nir.write(tmp, g))
    return {"path": path, "format": "nir", **info, "bytes": os.path.getsize(path)}


def _shape_str(shape) -> str:
    return "×".join(str(s) for s in shape) if len(shape) else "scalar"


def describe_partial(info: dict) -> str:
    """The printed summary of a partial export: every region (its input and output, their shapes and NIR
    layout, what it reads and feeds) and every host node (op, inputs, output shape, the region outputs it
    reads and the regions it feeds, why it is on the host)."""
    lines = [f"wrote {info['path']}: NIR partial export, {len(info['regions'])} region(s) holding "
             f"{info['nodes_in_nir']} of {info['graph_nodes']} graph nodes ({info['sites']} of {info['sites_total']} "
             f"SFN sites), {info['nodes_on_host']} host node(s); {info['nodes']} NIR nodes, {info['bytes']:,} bytes; "
             f"neurons {info['neurons_before']:,} graded -> {info['neurons_after']:,} binary, synapses "
             f"{info['synapses_before']:,} -> {info['synapses_after']:,}",
             "NIR regions (NIRGraph nodes of the file; tensor shapes without the batch axis; 'as' = the NIR "
             "layout, axes permuted by perm):"]

    def port(b):
        lay = "" if b["perm"] == sorted(b["perm"]) else f" as {_shape_str(b['nir_shape'])} (perm {b['perm']})"
        return f"{b['value']} {_shape_str(b['shape'])}{lay}"
    for r in info["regions"]:
        i, o = r["inputs"][0], r["outputs"][0]
        lines.append(f"  {r['name']}: {port(i)} [from {i['from']}] -> {port(o)} [to {', '.join(o['to'])}]; "
                     f"nodes {', '.join(r['nodes'])}")
    lines.append("host remainder (graph order; torch semantics of sfn_deploy.ir.OPS; parameters in the file's "
                 "metadata):")
    for h in info["host_nodes"]:
        ins = ", ".join(h["inputs"]) or "-"
        links = "".join([f"; reads {', '.join(h['reads'])}" if h["reads"] else "",
                         f"; feeds {', '.join(h['feeds'])}" if h["feeds"] else ""])
        shape = h["shape"][1:] if h["bdim"] == 0 else h["shape"]
        lines.append(f"  {h['name']} = {h['op']}({ins}) -> {_shape_str(shape)}{links}  [{h['why']}]")
    return "\n".join(lines)


# -- sizes ------------------------------------------------------------------------------------------------

def _numel(shape) -> int:
    return int(np.prod(shape)) if len(shape) else 1


def _counts(graph: Graph, names, nir_nodes) -> dict:
    """Neurons and synapses of the graph nodes ``names`` before (graded: one neuron per SFN unit) and of
    ``nir_nodes`` after the channel decomposition (one binary neuron per channel; fan-out/recombination
    layers included)."""
    nir = _nir()
    nodes = [n for n in graph if n.name in names]
    before_n = sum(_numel(s.shape[1:]) for s in nodes if s.op == "sfn")
    before_s = 0
    for n in nodes:
        if n.op == "linear":
            before_s += _numel(n.shape[1:]) * n.params["weight"].shape[1]
        elif n.op == "conv2d":
            before_s += _numel(n.shape[1:]) * _numel(n.params["weight"].shape[1:])
    nir_nodes = list(nir_nodes)
    after_n = sum(int(v.threshold.size) for v in nir_nodes if isinstance(v, nir.Threshold))
    return {"neurons_before": before_n, "neurons_after": after_n, "synapses_before": before_s,
            "synapses_after": _synapses(nir_nodes)}


def _synapses(nir_nodes) -> int:
    """Synapses of NIR nodes: every weight of a Linear/Affine, every weight use of a convolution."""
    nir, total = _nir(), 0
    for v in nir_nodes:
        if isinstance(v, (nir.Affine, nir.Linear)):
            total += int(v.weight.size)
        elif isinstance(v, (nir.Conv1d, nir.Conv2d)):
            total += int(np.prod(v.weight.shape[1:])) * v.weight.shape[0] * _conv_out_positions(v)
    return total


def counts(graph: Graph, nir_graph) -> dict:
    """:func:`_counts` of a whole network and its full NIR export."""
    return _counts(graph, {n.name for n in graph}, nir_graph.nodes.values())


def _conv_out_positions(v) -> int:
    dims = len(v.weight.shape) - 2
    size = np.atleast_1d(np.asarray(v.input_shape)).astype(int)
    k = v.weight.shape[2:]
    st, p, d = (np.broadcast_to(np.asarray(t), (dims,)) for t in (v.stride, v.padding, v.dilation))
    return int(np.prod([(s + 2 * int(pp) - int(dd) * (kk - 1) - 1) // int(ss) + 1
                        for s, pp, dd, kk, ss in zip(size, p, d, k, st, strict=True)]))


def export_nir(model: ConvertedModel, path: str, max_bytes: int | None = None) -> dict:
    """Write the NIR graph atomically (``nir.write`` to a temporary file, then rename); return a summary."""
    nir = _nir()
    g = to_nir(model, max_bytes)
    atomic_write(path, lambda tmp: nir.write(tmp, g))
    return {"path": path, "format": "nir", "nodes": len(g.nodes), "edges": len(g.edges),
            "bytes": os.path.getsize(path), "sites": len(model.sites), **counts(model.graph, g),
            "input_synapses": _input_synapses(model, g)}


def _input_synapses(model: ConvertedModel, nir_graph) -> int:
    """Synapses of the layers that read the input neuron's channels (0 without one): what ``--input-encoding``
    adds to the file, each input value being G binary channels (docs/concepts.md "Input encoding")."""
    site = next((s for s in model.sites if s.attrs.get("role") == "input"), None)
    if site is None:
        return 0
    return _synapses(nir_graph.nodes[r.name] for r in input_readers(model.graph, site) or ()
                     if r.name in nir_graph.nodes)


# -- running a NIR file with nirtorch ---------------------------------------------------------------------

class Threshold(torch.nn.Module):
    """NIR Threshold: 1 where v > θ (strict), stateless."""

    def __init__(self, theta):
        super().__init__()
        self.register_buffer("theta", torch.as_tensor(np.asarray(theta), dtype=torch.float32))

    def forward(self, v):
        return (v > self.theta).to(v.dtype)


class Scale(torch.nn.Module):
    def __init__(self, s):
        super().__init__()
        self.register_buffer("s", torch.as_tensor(np.asarray(s), dtype=torch.float32))

    def forward(self, x):
        return x * self.s


def _t(a):
    return torch.as_tensor(np.asarray(a), dtype=torch.float32)


def _ints(v, n=2):
    return tuple(int(i) for i in np.broadcast_to(np.asarray(v), (n,)))


def _affine(n):                  # nirtorch 2.6's default mapping loses the bias
    m = torch.nn.Linear(n.weight.shape[-1], n.weight.shape[-2], bias=True)
    m.weight.data, m.bias.data = _t(n.weight), _t(n.bias)
    return m


def _linear(n):
    m = torch.nn.Linear(n.weight.shape[-1], n.weight.shape[-2], bias=False)
    m.weight.data = _t(n.weight)
    return m


def _conv1d(n):                  # nir.read gives numpy scalars: make them ints
    pad = n.padding if isinstance(n.padding, str) else _ints(n.padding, 1)
    m = torch.nn.Conv1d(n.weight.shape[1] * int(n.groups), n.weight.shape[0], n.weight.shape[2],
                        stride=_ints(n.stride, 1), padding=pad, dilation=_ints(n.dilation, 1), groups=int(n.groups))
    m.weight.data, m.bias.data = _t(n.weight), _t(n.bias)
    return m


def _conv2d(n):                  # nir.read gives ndarray stride/padding: make them int tuples
    pad = n.padding if isinstance(n.padding, str) else _ints(n.padding)
    m = torch.nn.Conv2d(n.weight.shape[1] * int(n.groups), n.weight.shape[0], n.weight.shape[2:],
                        stride=_ints(n.stride), padding=pad, dilation=_ints(n.dilation), groups=int(n.groups))
    m.weight.data, m.bias.data = _t(n.weight), _t(n.bias)
    return m


def _avgpool2d(n):
    return torch.nn.AvgPool2d(_ints(n.kernel_size), _ints(n.stride), _ints(n.padding))


def _sumpool2d(n):               # an exact window sum (nirtorch 2.6 maps SumPool2d to LPPool2d)
    return torch.nn.AvgPool2d(_ints(n.kernel_size), _ints(n.stride), _ints(n.padding), divisor_override=1)


def _flatten_batched(n):         # NIR dims exclude the batch axis
    s = int(n.start_dim) + 1 if n.start_dim >= 0 else int(n.start_dim)
    e = int(n.end_dim) + 1 if n.end_dim >= 0 else int(n.end_dim)
    return torch.nn.Flatten(s, e)


class OneStepNeuron(torch.nn.Module):
    """A stateful NIR neuron for ONE timestep from rest (v = 0): v = gain·x + offset, spike = v > v_threshold
    (strict, as NIR's neuron equations). The reset that follows a spike does not affect this step."""

    def __init__(self, gain, offset, v_threshold):
        super().__init__()
        for k, v in (("gain", gain), ("offset", offset), ("theta", v_threshold)):
            self.register_buffer(k, torch.as_tensor(np.asarray(v, dtype=np.float64), dtype=torch.float32))

    def forward(self, x):
        return ((x * self.gain + self.offset) > self.theta).to(x.dtype)


def _one_step_if(n, dt):
    """nir.IF (dv/dt = R·I): one step of length dt from v = 0 gives v = dt·r·x for every integrator
    (no leak: forward Euler and exact integration agree)."""
    r = np.asarray(n.r, np.float64)
    return OneStepNeuron(dt * r, np.zeros_like(r), n.v_threshold)


def _one_step_lif(n, dt):
    """nir.LIF (τ dv/dt = (v_leak − v) + R·I): one forward-Euler step of length dt from v = 0 gives
    v = dt/τ · (v_leak + r·x). Euler is the convention of the exporters that write τ and r from a decay
    factor β = 1 − dt/τ (snnTorch's Leaky: r = τ/dt, so v = x); an exponential integrator (Rockpool) gives
    (1 − e^(−dt/τ))·(v_leak + r·x) instead."""
    k = dt / np.asarray(n.tau, np.float64)
    return OneStepNeuron(k * np.asarray(n.r, np.float64), k * np.asarray(n.v_leak, np.float64), n.v_threshold)


def nir_node_map(dt: float | None = None) -> dict:
    """nirtorch 2.6 node mappings that run our NIR graphs on batched input: strict Threshold, Scale,
    Affine with its bias, Conv1d/Conv2d/AvgPool2d with int tuples, Flatten shifted past the batch axis.

    With ``dt`` (the time step of the tool that wrote the file: NIR's neurons are continuous-time and the
    file does not say), also the stateful ``nir.IF`` and ``nir.LIF`` for one timestep from rest
    (:class:`OneStepNeuron`). ``nir.CubaLIF`` stays unmapped: after one step from rest its output depends on
    the reader's update order (snnTorch feeds the new synaptic current to the membrane, Norse the old one)."""
    nir = _nir()
    m = {nir.Threshold: lambda n: Threshold(n.threshold), nir.Scale: lambda n: Scale(n.scale),
         nir.Affine: _affine, nir.Linear: _linear, nir.Conv1d: _conv1d, nir.Conv2d: _conv2d,
         nir.AvgPool2d: _avgpool2d, nir.SumPool2d: _sumpool2d, nir.Flatten: _flatten_batched}
    if dt is not None:
        if not float(dt) > 0:
            raise UserError(f"dt must be a positive time step, got {dt}")
        m[nir.IF] = lambda n: _one_step_if(n, float(dt))
        m[nir.LIF] = lambda n: _one_step_lif(n, float(dt))
    return m


class NirModule(torch.nn.Module):
    """A NIR graph run by nirtorch for one timestep: ``module(x)`` → logits for the batch x."""

    def __init__(self, graph_module):
        super().__init__()
        self.graph_module = graph_module

    @torch.no_grad()
    def forward(self, x):
        y, _state = self.graph_module(x)
        return y


def _read(path_or_graph):
    """(NIRGraph, where) from a path (``nir.read``) or a graph."""
    nir = _nir()
    g = path_or_graph
    if isinstance(g, nir.NIRGraph):
        return g, "NIR graph"
    regular_file(g, "NIR file")           # HDF5 read by h5py: arrays and strings, nothing unpickled
    try:
        return nir.read(g), str(g)
    except Exception as e:                  # not HDF5, or not a NIR file
        raise UserError(f"{g}: not a readable NIR file ({reason(e)})") from None


def _is_partial(g) -> bool:
    return isinstance(getattr(g, "metadata", None), dict) and g.metadata.get("format") == PARTIAL_FORMAT


def _build(g, where: str, dt: float | None = None) -> NirModule:
    nir = _nir()
    import nirtorch
    node_map = nir_node_map(dt)
    known = (nir.Input, nir.Output, *node_map)
    bad = [f"  {name} ({type(n).__name__})" for name, n in g.nodes.items() if not isinstance(n, known)]
    if bad:
        names = ", ".join(sorted(t.__name__ for t in known))
        hint = ""
        if dt is None and any(isinstance(n, (nir.IF, nir.LIF)) for n in g.nodes.values()):
            hint = ("; IF and LIF run one timestep from rest with load_nir(path, dt=...), dt the time step of the "
                    "tool that wrote the file")
        if any(isinstance(n, nir.CubaLIF) for n in g.nodes.values()):
            hint += ("; CubaLIF has no single one-step form (readers differ in whether the membrane sees this "
                     "step's synaptic current)")
        raise UserError(f"{where}: {len(bad)} node(s) use primitives this runner does not map (it maps {names}"
                        f"{hint}):\n" + "\n".join(bad))
    return NirModule(nirtorch.nir_to_torch(g, node_map).eval())


def load_nir(path_or_graph, dt: float | None = None) -> NirModule:
    """Read a NIR file (or take a NIRGraph) and build it with ``nirtorch.nir_to_torch`` and our node map
    (``dt``: see :func:`nir_node_map`; needed only for files with IF/LIF neurons)."""
    g, where = _read(path_or_graph)
    if _is_partial(g):
        raise UserError(f"{where}: a partial NIR export (NIR regions + host remainder); run it with "
                        f"sfn_deploy.exporters.nir.load_partial / run_partial")
    return _build(g, where, dt)


class PartialModule(torch.nn.Module):
    """A partial NIR export run end to end: each region by nirtorch (:func:`nir_node_map`), each host node
    with the torch reference ops of :mod:`sfn_deploy.ops`, in the order of the file's pipeline.
    Everything comes from the file: its regions and its metadata (nothing from the converted model).

    ``module(x)`` → the network output; ``module(x, spikes=True)`` → (output, {site: binary channel
    spikes (batch, G, *site shape) in the host layout, channel g = threshold g, positive first})."""

    def __init__(self, g, where: str = "NIR graph"):
        super().__init__()
        if not _is_partial(g):
            raise UserError(f"{where}: not a partial NIR export of sfn-deploy (no '{PARTIAL_FORMAT}' metadata); "
                            f"run a full export with load_nir")
        meta = g.metadata
        if int(meta.get("version", 0)) > PARTIAL_VERSION:
            raise UserError(f"{where}: partial NIR format version {meta.get('version')} is newer than this "
                            f"sfn-deploy reads ({PARTIAL_VERSION})")
        spec = json.loads(meta["pipeline"])
        self.spec = spec
        self.region_spec = {r["name"]: r for r in spec["regions"]}
        self.regions = torch.nn.ModuleDict({name: _build(g.nodes[name], f"{where}, {name}")
                                            for name in self.region_spec})
        params = meta.get("host_params") or {}
        host = {h["name"]: h for h in spec["host_nodes"]}
        nodes = []
        for name, v in spec["values"].items():
            h = host.get(name)
            p = {} if h is None or h["params"] is None else {
                k: torch.as_tensor(np.asarray(a)) for k, a in params[h["params"]].items()}
            try:
                nodes.append(Node(name, v["op"], list(v["inputs"]), dict(h["attrs"]) if h else {}, p,
                                  list(v["shape"]), v["bdim"]))
            except ValueError as e:
                raise UserError(f"{where}: {e} (written by a newer sfn-deploy?)") from None
        self.graph = Graph(nodes, spec["output"])

    @torch.no_grad()
    def run_region(self, name: str, x, spikes: bool = False):
        """One region on its input value x (host layout, batch first) → its output value in the host layout
        (and, with ``spikes``, the threshold channels of its sites as in :meth:`forward`)."""
        r = self.region_spec[name]
        i, o = r["inputs"][0], r["outputs"][0]
        module = self.regions[name]
        caught: dict = {}
        hooks = []
        if spikes:
            children = dict(cast(torch.nn.Module, module.graph_module).named_children())
            for site, s in r["sites"].items():
                m = children[s["threshold"].replace(".", "_")]
                hooks.append(m.register_forward_hook(
                    lambda mod, inp, out, site=site, s=s: caught.__setitem__(site, self._spikes(out, s))))
        try:
            y = module(x.permute(0, *[p + 1 for p in i["perm"]]))
        finally:
            for h in hooks:
                h.remove()
        y = y.permute(0, *[q + 1 for q in _inverse(o["perm"])])
        return (y, caught) if spikes else y

    @torch.no_grad()
    def forward(self, x, spikes: bool = False):
        from ..neurons import fire
        from ..ops import apply
        env = {self.spec["input"]: x}
        caught: dict[str, torch.Tensor] = {}
        batch = x.shape[0]
        for kind, name in self.spec["steps"]:
            if kind == "region":
                r = self.region_spec[name]
                y = self.run_region(name, env[r["inputs"][0]["value"]], spikes)
                if spikes:
                    y, sp = y
                    caught.update(sp)
                env[r["outputs"][0]["value"]] = y
            else:
                node = self.graph[name]
                args = [env[v] for v in node.inputs]
                if node.op == "constant":
                    out = node.params["value"]
                elif node.op == "sfn":
                    out = fire(node, args[0])[0]
                else:
                    out = apply(node, args, self.graph, batch)
                env[name] = out
        y = env[self.spec["output"]]
        return (y, caught) if spikes else y

    @staticmethod
    def _spikes(out, s):
        b, gc = out.shape[:2]
        g = s["channels"]
        t = out.reshape(b, g, gc // g, *out.shape[2:])
        return t.permute(0, 1, *[q + 2 for q in _inverse(s["perm"])])


def load_partial(path_or_graph) -> PartialModule:
    """Read a partial NIR export (or take its container NIRGraph) and build its runner."""
    g, where = _read(path_or_graph)
    return PartialModule(g, where)


def run_partial(path_or_graph, x, *, spikes: bool = False, batch_size: int = 256, each=None):
    """Run a partial NIR export on the batch x (in chunks of ``batch_size``): the network output, and with
    ``spikes=True`` the threshold channels of every site in a NIR region (see :class:`PartialModule`), each
    chunk's passed through ``each(site, channels)`` where given (what depends on the chunk's own batch)."""
    module = path_or_graph if isinstance(path_or_graph, PartialModule) else load_partial(path_or_graph)
    outs, caught = [], defaultdict(list)
    for k in range(0, x.shape[0], batch_size):
        r = module(x[k:k + batch_size], spikes=spikes)
        if spikes:
            r, sp = r
            for site, v in sp.items():
                caught[site].append(v if each is None else each(site, v))
        outs.append(r)
    y = torch.cat(outs)
    return (y, {k: torch.cat(v) for k, v in caught.items()}) if spikes else y


def _channel_levels(site: Node, ch: torch.Tensor) -> torch.Tensor:
    """Signed levels from binary threshold channels (batch, G, ...), positive copies first: the level is
    table[#positive fired] − table[#negative fired] (channels of a level are cumulative)."""
    npos, table = site.params["bounds_pos"].numel(), site.params["table"]
    ch = ch.round().long()
    lv = table[ch[:, :npos].sum(1)]
    return lv - table[ch[:, npos:].sum(1)] if ch.shape[1] > npos else lv


class NirBackend(Simple):
    """The ``nir`` backend of :mod:`sfn_deploy.backends`: the file written, read back with ``nir.read`` and run
    by nirtorch; a network NIR cannot fully express runs as its partial export (NIR regions plus host nodes).
    The ANN has no NIR form (it runs on the reference)."""
    runs_ann = False
    one_stream = False
    writes_folder = False

    def runner(self, model: ConvertedModel, *, ann: bool = False, threads: int | None = None,
               options: dict | None = None):
        import tempfile
        try:                    # what NIR cannot express (a Transformer's host work) runs beside the NIR regions
            check_nir(model.graph)
            partial = False
        except UserError:
            partial = True
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "model.nir")
            if partial:
                export_nir_partial(model, path)
                return load_partial(path)
            export_nir(model, path)
            return load_nir(path)

    def layers(self, model: ConvertedModel, x: torch.Tensor, batch_size: int, options: dict | None = None) -> dict:
        """Levels decoded from each site's threshold channels (copy index outermost: the positive copies,
        then the negative ones), as nirtorch computes them."""
        runner = self.runner(model)
        if isinstance(runner, PartialModule):          # sites inside NIR regions: channels (batch, G, *shape)
            rows = Rows(model.graph)                   # per batch: a folded or sequence-first batch axis
            y, caught = run_partial(runner, x, spikes=True, batch_size=batch_size,
                                    each=lambda name, ch: rows(name, _channel_levels(model.graph[name], ch)))
            return {"outputs": y.numpy(), "pre": {}, "levels": {k: v.numpy() for k, v in caught.items()}}
        modules = dict(runner.named_modules())
        levels: dict[str, list] = {}
        hooks = []
        for site in model.sites:
            mod = modules.get(f"graph_module.{site.name}")
            if mod is None:
                continue
            g = site.params["bounds_pos"].numel() + site.params["bounds_neg"].numel()

            def keep(_m, _inp, out, site=site, g=g):
                levels.setdefault(site.name, []).append(
                    _channel_levels(site, out.reshape(out.shape[0], g, -1)).numpy())
            hooks.append(mod.register_forward_hook(keep))
        try:
            outs = [runner(x[i:i + batch_size]).numpy() for i in range(0, len(x), batch_size)]
        finally:
            for h in hooks:
                h.remove()
        return {"outputs": np.concatenate(outs), "levels": {k: np.concatenate(v) for k, v in levels.items()},
                "pre": {}}

    def export(self, model: ConvertedModel, path: str, *, partial: bool = False, max_size: float | None = None,
               **_other) -> dict:
        limit = None if max_size is None else int(max_size * 2 ** 30)
        return export_nir_partial(model, path, limit) if partial else export_nir(model, path, limit)

    def describe_export(self, info: dict) -> str:
        if info.get("partial"):
            return describe_partial(info)
        line = (f"wrote {info['path']}: NIR, {info['nodes']} nodes, {info['bytes']:,} bytes, {info['sites']} SFN "
                f"sites; neurons {info['neurons_before']:,} graded -> {info['neurons_after']:,} binary, synapses "
                f"{info['synapses_before']:,} -> {info['synapses_after']:,}")
        if info.get("input_synapses", 0) * 2 > info["synapses_after"]:
            line += (f"; {info['input_synapses']:,} of them read the input neuron's channels (convert with "
                     "--input-encoding analog for a file without it)")
        return line

    def support(self, model: ConvertedModel) -> str:
        try:
            host = nir_host_nodes(model.graph)
        except ImportError:
            return "nir not installed"
        return f"partial (--partial): {len(host)} node(s) NIR cannot express stay on the host" if host else "full"


BACKEND = NirBackend()
