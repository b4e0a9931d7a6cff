"""NIR exporter (SPEC §7): the converted SFN network as a graph of standard NIR primitives.

NIR has no multi-level neuron, so each SFN site of N positive (M negative) boundaries
becomes N + M parallel binary ``nir.Threshold`` channels on the same pre-activation:

* the weight layer in front of the site is emitted with its output rows tiled G = N + M
  times (the M negative copies negated, so those channels see −x); where the site's
  input is not such a layer, a Linear / 1×1 Conv2d of stacked ±identities fans it out;
* ``nir.Threshold`` is strict (fires at v > θ) while the SFN fires at x ≥ b, so θ is
  ``nextafter(b, −inf)`` in float32: for float32 inputs ``x > θ ⟺ x ≥ b`` exactly;
* channel g's spike is worth the level increment (y_g − y_{g−1})·λθ± (negated for the
  negative branch); ``Σ_g spike_g · inc_g`` is the site's output, so the increments are
  folded into the NEXT weight layer's weights (through average pooling and flatten,
  which are linear and per channel). Where no weight layer follows (the network output),
  an explicit Linear / 1×1 Conv2d recombines them.

Channel layout: the expanded tensor is [G·C, ...] with the copy index outermost, so
after a flatten copy g occupies one contiguous block of features.

Only what NIR expresses is exported: input, linear, conv2d (groups 1), SFN sites,
avg_pool2d (no padding), max_pool2d straight after a site (channels are cumulative, so the
pooled level's channel g is the OR of the window's channel g — a SumPool2d and a Threshold;
AND for negative channels), flatten (and flatten-like reshape). Anything else — max pooling
of analog values, layer_norm, softmax, gelu, products of activations, sums of two tensors —
is refused with a :class:`UserError` listing every offending node.

Running the file: no NIR reader maps ``nir.Threshold`` out of the box
(``research/nir-readers.md``), so :func:`nir_node_map` gives nirtorch 2.6 the missing
mappings and :func:`load_nir` returns a torch module computing logits for one timestep.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import UserError
from ..ir import Graph, Node
from ..model_file import ConvertedModel, atomic_write

__all__ = ["to_nir", "export_nir", "nir_node_map", "load_nir", "check_nir"]

_F32 = np.float32
_LAYOUT_OK = {"input", "linear", "conv2d", "sfn", "flatten", "reshape", "avg_pool2d", "max_pool2d"}


def _nir():
    import nir          # imported lazily: only this exporter needs it
    return nir


# -- what NIR can express ---------------------------------------------------------------------------------

def _is_flatten(node: Node, graph: Graph) -> bool:
    """flatten / reshape that merges every axis but the (first) batch axis: NIR's Flatten."""
    src = graph[node.inputs[0]]
    if node.op == "flatten":
        return node.attrs["start"] == 1 and node.attrs["end"] in (-1, len(src.shape) - 1) and src.bdim == 0
    return len(node.shape) == 2 and node.bdim == 0 and src.bdim == 0


def _problem(node: Node, graph: Graph) -> str | None:
    """Why NIR cannot express this node (None when it can)."""
    op, a = node.op, node.attrs
    if op == "max_pool2d":
        if graph[node.inputs[0]].op != "sfn":
            return "max pooling of analog values: NIR has no max-pool primitive (only spikes straight from an " \
                   "SFN site are pooled, as OR/AND of threshold channels)"
        if any(a.get("padding", [0])) or a.get("ceil_mode") or any(d != 1 for d in a.get("dilation", [1])):
            return "max pooling with padding, dilation or ceil_mode"
    if op not in _LAYOUT_OK:
        return "no NIR primitive expresses it"
    if node.bdim != 0:
        return "batch axis is not the first axis"
    if op == "conv2d" and a.get("groups", 1) != 1:
        return "grouped convolution is not supported by the NIR exporter"
    if op == "avg_pool2d" and (any(a.get("padding", [0])) or a.get("ceil_mode") or a.get("divisor_override")):
        return "average pooling with padding, ceil_mode or divisor_override"
    if op in ("flatten", "reshape") and not _is_flatten(node, graph):
        return "only a flatten of every axis but the batch axis maps to NIR Flatten"
    if op == "sfn" and node.params["bounds_pos"].numel() + node.params["bounds_neg"].numel() == 0:
        return "SFN site without boundaries"
    return None


def check_nir(graph: Graph) -> None:
    """Raise a UserError listing every node NIR cannot express, one per line."""
    bad = [f"  {n.name} ({n.op}): {why}" for n in graph if (why := _problem(n, graph))]
    if bad:
        raise UserError(f"NIR export refused: {len(bad)} node(s) NIR cannot express:\n" + "\n".join(bad))


# -- lowering ---------------------------------------------------------------------------------------------

@dataclass
class _Value:
    """A lowered value: its NIR node, its NIR shape (no batch) and, for expanded spikes, the
    increment of each copy (the real value is Σ_g copy_g · inc[g]; ``base`` its unexpanded shape)."""
    node: str
    shape: tuple
    inc: np.ndarray | None = None
    base: tuple | None = None


def _site_channels(site: Node):
    """(float32 thresholds θ, float64 increments, signs) of the G binary channels of one SFN site."""
    p = site.params
    table = p["table"].double().numpy()
    steps = p["steps"].double().numpy()
    bpos, bneg = p["bounds_pos"].numpy().astype(_F32), p["bounds_neg"].numpy().astype(_F32)
    dy = np.diff(table)
    theta = np.concatenate([np.nextafter(bpos, _F32(-np.inf)), np.nextafter(bneg, _F32(-np.inf))]).astype(_F32)
    inc = np.concatenate([dy[:bpos.size] * steps[0], -dy[:bneg.size] * steps[1]])
    sign = np.concatenate([np.ones(bpos.size), -np.ones(bneg.size)])
    return theta, inc, sign


class _Lowering:
    def __init__(self, graph: Graph, input_shape):
        self.nir = _nir()
        self.graph, self.users = graph, graph.users()
        self.nodes: dict = {}
        self.edges: list = []
        self.env: dict[str, _Value] = {}
        self.input_shape = tuple(int(s) for s in input_shape)

    def add(self, name: str, nir_node, src: str | None) -> str:
        name = name if name not in self.nodes else f"{name}_{len(self.nodes)}"
        self.nodes[name] = nir_node
        if src is not None:
            self.edges.append((src, name))
        return name

    # a synaptic layer: fold the increments of an expanded input, optionally tile rows for a following site
    def weight_layer(self, name, op, w, b, attrs, x: _Value, site: Node | None) -> _Value:
        w = w.astype(np.float64)
        if x.inc is not None:               # fold Σ_g copy_g·inc_g into the weights (copy index outermost)
            w = np.concatenate([w * g for g in x.inc], axis=1)
        out_shape = self._out_shape(op, w, attrs, x)
        inc = theta = None
        if site is not None:                # one copy of the rows per channel, negated for the negative branch
            theta, inc, sign = _site_channels(site)
            w = np.concatenate([w * s for s in sign], axis=0)
            b = None if b is None else np.concatenate([b * s for s in sign])
        w = w.astype(_F32)
        nir = self.nir
        if op == "linear":
            node = nir.Linear(weight=w) if b is None else nir.Affine(weight=w, bias=b.astype(_F32))
        else:
            bias = np.zeros(w.shape[0], _F32) if b is None else b.astype(_F32)
            node = nir.Conv2d(input_shape=tuple(x.shape[1:]), weight=w, stride=tuple(attrs["stride"]),
                              padding=tuple(attrs["padding"]), dilation=tuple(attrs["dilation"]), groups=1,
                              bias=bias)
        n = self.add(name, node, x.node)
        if site is None:
            return _Value(n, out_shape)
        shape = (len(inc) * out_shape[0],) + tuple(out_shape[1:])
        th = np.broadcast_to(np.repeat(theta, out_shape[0]).reshape((-1,) + (1,) * (len(shape) - 1)), shape)
        t = self.add(site.name, nir.Threshold(threshold=np.ascontiguousarray(th, _F32)), n)
        return _Value(t, shape, inc, tuple(out_shape))

    @staticmethod
    def _out_shape(op, w, attrs, x: _Value) -> tuple:
        if op == "linear":
            return (w.shape[0],)
        h, wd = x.shape[1:]
        k = w.shape[2:]
        o = [(s + 2 * p - d * (kk - 1) - 1) // st + 1 for s, p, d, kk, st in
             zip((h, wd), attrs["padding"], attrs["dilation"], k, attrs["stride"])]
        return (w.shape[0], *o)

    def identity(self, name, x: _Value, site: Node | None) -> _Value:
        """Fan-out (site given) or recombination (site None) as a Linear / 1×1 Conv2d of identities."""
        base = x.base or x.shape
        c = base[0]
        if len(base) == 1:
            return self.weight_layer(name, "linear", np.eye(c), None, {}, x, site)
        if len(base) == 3:
            attrs = {"stride": [1, 1], "padding": [0, 0], "dilation": [1, 1]}
            return self.weight_layer(name, "conv2d", np.eye(c).reshape(c, c, 1, 1), None, attrs, x, site)
        raise UserError(f"NIR export: node {name} has a {len(base)}-D value; only 1-D and C×H×W are supported")

    def max_pool(self, node: Node, x: _Value) -> _Value:
        """Max pooling of threshold channels: the pooled level reaches g iff some input in the window does
        (OR: window sum > 0.5) and falls to −j iff every input does (AND: window sum > K − 0.5), since the
        channels of a level are cumulative. A SumPool2d and a Threshold per channel, exact."""
        a, nir = node.attrs, self.nir
        k = tuple(a["kernel_size"])
        st = tuple(a["stride"]) if a.get("stride") else k
        c, h, w = x.shape
        oh, ow = (h - k[0]) // st[0] + 1, (w - k[1]) // st[1] + 1
        n = self.add(node.name, nir.SumPool2d(kernel_size=np.array(k), stride=np.array(st),
                                              padding=np.array([0, 0])), x.node)
        per = c // len(x.inc)                       # channels of one copy
        window = k[0] * k[1]
        theta = np.where(x.inc > 0, 0.5, window - 0.5).astype(_F32)   # positive copies OR, negative copies AND
        th = np.broadcast_to(np.repeat(theta, per).reshape(-1, 1, 1), (c, oh, ow))
        t = self.add(node.name + "_any", nir.Threshold(threshold=np.ascontiguousarray(th, _F32)), n)
        return _Value(t, (c, oh, ow), x.inc, (x.base[0], oh, ow))

    def lower(self) -> None:
        nir, g = self.nir, self.graph
        fused: set[str] = set()
        for node in g:
            if node.name in fused:
                continue
            x = self.env.get(node.inputs[0]) if node.inputs else None
            op, p, a = node.op, node.params, node.attrs
            if op == "input":
                n = self.add(node.name, nir.Input(input_type={"input": np.array(self.input_shape)}), None)
                self.env[node.name] = _Value(n, self.input_shape)
            elif op in ("linear", "conv2d"):
                users = self.users[node.name]
                site = users[0] if len(users) == 1 and users[0].op == "sfn" and node.name != g.output else None
                w = p["weight"].double().numpy()
                b = p["bias"].double().numpy() if p.get("bias") is not None else None
                self.env[(site or node).name] = self.weight_layer(node.name, op, w, b, a, x, site)
                if site is not None:
                    fused.add(site.name)
            elif op == "sfn":
                if x.inc is not None:           # spikes straight into another site: recombine first
                    x = self.identity(node.name + "_recombine", x, None)
                self.env[node.name] = self.identity(node.name + "_fanout", x, node)
            elif op == "avg_pool2d":
                k = tuple(a["kernel_size"])
                st = tuple(a["stride"]) if a.get("stride") else k
                n = self.add(node.name, nir.AvgPool2d(kernel_size=np.array(k), stride=np.array(st),
                                                      padding=np.array([0, 0])), x.node)
                c, h, w = x.shape
                oh, ow = (h - k[0]) // st[0] + 1, (w - k[1]) // st[1] + 1
                base = None if x.base is None else (x.base[0], oh, ow)
                self.env[node.name] = _Value(n, (c, oh, ow), x.inc, base)
            elif op == "max_pool2d":
                self.env[node.name] = self.max_pool(node, x)
            elif op in ("flatten", "reshape"):
                flat = int(np.prod(x.shape))
                n = self.add(node.name, nir.Flatten(input_type={"input": np.array(x.shape)}, start_dim=0,
                                                    end_dim=-1), x.node)
                base = None if x.base is None else (int(np.prod(x.base)),)
                self.env[node.name] = _Value(n, (flat,), x.inc, base)
            else:                               # check_nir refused it already
                raise UserError(f"NIR export: node {node.name} ({op}) cannot be expressed")
        out = self.env[g.output]
        if out.inc is not None:
            out = self.identity(g.output + "_recombine", out, None)
        self.add("output", nir.Output(output_type={"output": np.array(out.shape)}), out.node)


def to_nir(model: ConvertedModel):
    """The converted network as a ``nir.NIRGraph`` of standard primitives (see the module docstring)."""
    check_nir(model.graph)
    low = _Lowering(model.graph, model.input_shape)
    low.lower()
    return low.nir.NIRGraph(nodes=low.nodes, edges=low.edges, type_check=False)


# -- sizes ------------------------------------------------------------------------------------------------

def _numel(shape) -> int:
    return int(np.prod(shape)) if len(shape) else 1


def counts(graph: Graph, nir_graph) -> dict:
    """Neurons and synapses (weighted connections) before (graded: one neuron per SFN unit) and after
    the channel decomposition (one binary neuron per channel; fan-out/recombination layers included)."""
    nir = _nir()
    before_n = sum(_numel(s.shape[1:]) for s in graph.sites)
    before_s = 0
    for n in graph:
        if n.op == "linear":
            before_s += _numel(n.shape[1:]) * n.params["weight"].shape[1]
        elif n.op == "conv2d":
            before_s += _numel(n.shape[1:]) * _numel(n.params["weight"].shape[1:])
    after_n = sum(int(v.threshold.size) for v in nir_graph.nodes.values() if isinstance(v, nir.Threshold))
    after_s = 0
    for v in nir_graph.nodes.values():
        if isinstance(v, (nir.Affine, nir.Linear)):
            after_s += int(v.weight.size)
        elif isinstance(v, nir.Conv2d):
            after_s += int(np.prod(v.weight.shape[1:])) * v.weight.shape[0] * _conv_out_pixels(v)
    return {"neurons_before": before_n, "neurons_after": after_n, "synapses_before": before_s,
            "synapses_after": after_s}


def _conv_out_pixels(v) -> int:
    h, w = (int(s) for s in v.input_shape)
    k = v.weight.shape[2:]
    st, p, d = (np.broadcast_to(np.asarray(t), (2,)) for t in (v.stride, v.padding, v.dilation))
    return int(np.prod([(s + 2 * int(pp) - int(dd) * (kk - 1) - 1) // int(ss) + 1
                        for s, pp, dd, kk, ss in zip((h, w), p, d, k, st)]))


def export_nir(model: ConvertedModel, path: str) -> dict:
    """Write the NIR graph atomically (``nir.write`` to a temporary file, then rename); return a summary."""
    nir = _nir()
    g = to_nir(model)
    atomic_write(path, lambda tmp: nir.write(tmp, g))
    return {"path": path, "format": "nir", "nodes": len(g.nodes), "edges": len(g.edges),
            "bytes": os.path.getsize(path), "sites": len(model.sites), **counts(model.graph, g)}


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


def _ints(v):
    return tuple(int(i) for i in np.broadcast_to(np.asarray(v), (2,)))


def _affine(n):                  # nirtorch 2.6's default mapping loses the bias
    m = torch.nn.Linear(n.weight.shape[-1], n.weight.shape[-2], bias=True)
    m.weight.data, m.bias.data = _t(n.weight), _t(n.bias)
    return m


def _linear(n):
    m = torch.nn.Linear(n.weight.shape[-1], n.weight.shape[-2], bias=False)
    m.weight.data = _t(n.weight)
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
    s = n.start_dim + 1 if n.start_dim >= 0 else n.start_dim
    e = n.end_dim + 1 if n.end_dim >= 0 else n.end_dim
    return torch.nn.Flatten(s, e)


def nir_node_map() -> dict:
    """nirtorch 2.6 node mappings that run our NIR graphs on batched input: strict Threshold, Scale,
    Affine with its bias, Conv2d/AvgPool2d with int tuples, Flatten shifted past the batch axis."""
    nir = _nir()
    return {nir.Threshold: lambda n: Threshold(n.threshold), nir.Scale: lambda n: Scale(n.scale),
            nir.Affine: _affine, nir.Linear: _linear, nir.Conv2d: _conv2d, nir.AvgPool2d: _avgpool2d,
            nir.SumPool2d: _sumpool2d, nir.Flatten: _flatten_batched}


class NirModule(torch.nn.Module):
    """A NIR graph run by nirtorch for one timestep: ``module(x)`` → logits for the batch x."""

    def __init__(self, graph_module):
        super().__init__()
        self.graph_module = graph_module

    @torch.no_grad()
    def forward(self, x):
        y, _state = self.graph_module(x)
        return y


def load_nir(path_or_graph) -> NirModule:
    """Read a NIR file (or take a NIRGraph) and build it with ``nirtorch.nir_to_torch`` and our node map."""
    nir = _nir()
    import nirtorch
    g = path_or_graph
    where = "NIR graph"
    if not isinstance(g, nir.NIRGraph):
        if not os.path.exists(g):
            raise UserError(f"{g}: no such file")
        where = str(g)
        try:
            g = nir.read(g)
        except Exception as e:                  # not HDF5, or not a NIR file
            raise UserError(f"{g}: not a readable NIR file ({type(e).__name__}: {e})")
    known = (nir.Input, nir.Output, *nir_node_map())
    bad = [f"  {name} ({type(n).__name__})" for name, n in g.nodes.items() if not isinstance(n, known)]
    if bad:
        names = ", ".join(sorted(t.__name__ for t in known))
        raise UserError(f"{where}: {len(bad)} node(s) use primitives this runner does not map (it maps {names}):\n"
                        + "\n".join(bad))
    return NirModule(nirtorch.nir_to_torch(g, nir_node_map()).eval())
