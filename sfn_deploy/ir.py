"""The converted network: one small graph representation that every later stage reads.

A :class:`Graph` is a list of :class:`Node` in topological order. Each node names
one operation from :data:`OPS` with torch semantics, its inputs (names of earlier
nodes), JSON-able attributes and tensor parameters. Exporters (ONNX, NIR, Lava),
the simulators and the reports read this structure; none of them needs torch.fx,
the source model or pickled code. ``to_dict``/``from_dict`` hold only plain
containers and tensors, so a saved model loads with ``torch.load(weights_only=True)``.

Batch dimension: every value knows where its batch axis is (``bdim``, None for
constants). Shape attributes (``reshape``, ``expand``) write the batch entry as the
string ``"B"`` or ``"B*k"`` (k other axes merged into it), resolved at run time.

Every op's inputs, attributes and parameters are declared in the op table (:mod:`sfn_deploy.ops`, rendered
as docs/ops.md): their types, meanings, which are required and which module writes them. The checks below
(:func:`check_declared`) hold every node to its declaration; a key the table does not declare is refused.

The ``sfn`` node is the Scale-and-Fire neuron (SPEC §4), one timestep:

    o = λθ⁺ · y⁺(x)  for x ≥ 0,   o = −λθ⁻ · y⁻(−x)  for x < 0
    y(u) = y_i where b_i ≤ u < b_{i+1};  0 below b_1;  y_N at and above b_N

with levels y_1..y_N, λ, θ⁺, θ⁻ (θ⁻ = 0 disables the negative branch) in its attrs and the float32 boundaries,
steps and level table derived from them by :func:`sfn_deploy.passes.configure` in its params. Backends use these
stored float32 values, so all of them fire at the same inputs.

The ``if_neuron`` node is a multi-level integrate-and-fire neuron run over ``T`` synchronous
timesteps (the baselines of docs/methods.md: rate-coded IF, ECMT's multi-threshold neuron).
It fires by the same attrs and params as ``sfn``, applied to its membrane potential instead of its input, and
resets by subtraction:

    m(t) = v(t−1) + x(t);  o(t) = sfn-rule(m(t));  v(t) = m(t) − o(t);  v(0) = v0 · step⁺

A graph holding such nodes runs T steps (``Graph.timesteps``,
:mod:`sfn_deploy.simulators.temporal`); its output is the mean of the T output values. Single-timestep
consumers (the ONNX/NIR/Lava exporters) refuse it (:func:`sfn_deploy.methods.require_single_step`).
``Graph.method`` names the conversion method ("sfn" for files written before methods existed).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .ops import ANNOTATIONS, TABLE, Attr, apply, resolve_shape  # noqa: F401  (resolve_shape: part of ir's API)

FORMAT = "sfn-deploy/converted"
FORMAT_VERSION = 2         # 2: multi-timestep methods (if_neuron, Graph.timesteps/method); files with
                           # only single-step SFN content are still written as version 1

# op -> (kind, description), from the op table (sfn_deploy/ops.py: add an op there). kind: "weight" (synaptic
# layer with stored weights), "product" (product of two activations), "neuron", "host" (computed off the neuron
# cores: normalisation, nonlinearities, residual arithmetic), "layout" (moves or selects data, no arithmetic),
# "pool", "io".
OPS = {name: (spec.kind, spec.description) for name, spec in TABLE.items()}


NEURON_OPS = ("sfn", "if_neuron")     # nodes with fire attrs/params (``Graph.sites``)
STATEFUL_OPS = ("if_neuron",)          # nodes that keep a membrane potential across timesteps
# --method mbe (sfn_deploy/mbe.py): ``mbe_neuron`` nodes, and gelu/softmax/layer_norm nodes with attrs["mbe_fn"]
# run their spiking MBE form (T internal steps per neuron, one pass of the graph); the ANN ignores the attrs.


def op_kind(op: str) -> str:
    return OPS[op][0]


@dataclass
class Node:
    name: str
    op: str
    inputs: list[str] = field(default_factory=list)
    attrs: dict = field(default_factory=dict)
    params: dict[str, torch.Tensor] = field(default_factory=dict)
    shape: list[int] = field(default_factory=list)   # example shape, batch axis as 1
    bdim: int | None = 0                              # batch axis of the output
    source: str = ""                                  # module path / source line it came from

    def __post_init__(self):
        if self.op not in OPS:
            raise ValueError(f"unknown op {self.op!r} for node {self.name!r}")

    @property
    def kind(self) -> str:
        return op_kind(self.op)

    def to_dict(self) -> dict:
        return {"name": self.name, "op": self.op, "inputs": list(self.inputs), "attrs": dict(self.attrs),
                "params": dict(self.params), "shape": list(self.shape), "bdim": self.bdim,
                "source": self.source}

    @classmethod
    def from_dict(cls, d: dict) -> Node:
        return cls(**d)


@dataclass
class Graph:
    nodes: list[Node]
    output: str
    timesteps: int = 1          # T: synchronous steps per inference (1 for SFN)
    method: str = "sfn"         # the conversion method (docs/methods.md)
    # a model returning several tensors: the output is their flattened concatenation, these their per-sample
    # shapes in order (None: one tensor, returned as it is)
    output_parts: list[list[int]] | None = None

    def __post_init__(self):
        self._index = {n.name: n for n in self.nodes}

    def __getitem__(self, name: str) -> Node:
        return self._index[name]

    def __iter__(self):
        return iter(self.nodes)

    def reindex(self) -> None:
        self._index = {n.name: n for n in self.nodes}

    @property
    def input(self) -> Node:
        return next(n for n in self.nodes if n.op == "input")

    @property
    def sites(self) -> list[Node]:
        """Every spiking neuron site (``sfn`` and ``if_neuron`` nodes)."""
        return [n for n in self.nodes if n.op in NEURON_OPS]

    @property
    def stateful(self) -> bool:
        """True when the graph must run over T timesteps (it holds a stateful neuron)."""
        return any(n.op in STATEFUL_OPS for n in self.nodes)

    def stages(self, extra=frozenset(), free=frozenset(), kinds=("weight", "product", "host")) -> dict[str, int]:
        """Pipeline step of each node: nodes of ``kinds`` (the report's model: weight layers, products, host
        operations; a Lava pipeline's: weight layers only) and the nodes named in ``extra`` (poolings run as
        pooling layers) each add one, those named in ``free`` (residual sums and clips a chip does in its
        synapses and neurons) none."""
        out: dict[str, int] = {}
        for n in self.nodes:
            s = max((out[i] for i in n.inputs), default=0)
            out[n.name] = s + (1 if (n.kind in kinds or n.name in extra) and n.name not in free else 0)
        return out

    def users(self) -> dict[str, list[Node]]:
        out: dict[str, list[Node]] = {n.name: [] for n in self.nodes}
        for n in self.nodes:
            for i in n.inputs:
                out[i].append(n)
        return out

    def fresh_name(self, base: str) -> str:
        name, k = base, 1
        while name in self._index:
            k += 1
            name = f"{base}_{k}"
        return name

    def insert_after(self, anchor: str, node: Node) -> None:
        pos = next(i for i, n in enumerate(self.nodes) if n.name == anchor)
        self.nodes.insert(pos + 1, node)
        self._index[node.name] = node

    def remove(self, name: str) -> None:
        self.nodes = [n for n in self.nodes if n.name != name]
        del self._index[name]

    def replace_uses(self, old: str, new: str, skip: str | None = None) -> None:
        for n in self.nodes:
            if n.name != skip:
                n.inputs = [new if i == old else i for i in n.inputs]
        if self.output == old:
            self.output = new

    def to_dict(self) -> dict:
        d = {"nodes": [n.to_dict() for n in self.nodes], "output": self.output, "timesteps": self.timesteps,
             "method": self.method}
        if self.output_parts is not None:
            d["output_parts"] = [list(p) for p in self.output_parts]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Graph:
        parts = d.get("output_parts")
        return cls([Node.from_dict(n) for n in d["nodes"]], d["output"], int(d.get("timesteps", 1)),
                   str(d.get("method", "sfn")), None if parts is None else [[int(v) for v in p] for p in parts])


# ---------------------------------------------------------------- validation

class GraphError(ValueError):
    """A graph that breaks the rules of this module (the message names the node); a loaded file holding one
    is damaged or was edited by hand."""


_NODE_FIELDS = ("name", "op", "inputs", "attrs", "params", "shape", "bdim", "source")
def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _label(i: int, nd) -> str:
    name = nd.get("name") if isinstance(nd, dict) else None
    return f"node {name!r}" if isinstance(name, str) and name else f"node #{i}"


def check_graph_dict(d) -> None:
    """Check the plain structure of ``Graph.to_dict()`` output (types of every field) before it is built,
    so that garbage gives one :class:`GraphError` naming the place instead of a TypeError deep inside."""
    if not isinstance(d, dict):
        raise GraphError(f"the graph is a {type(d).__name__}, not a dict")
    nodes = d.get("nodes")
    if not isinstance(nodes, list):
        raise GraphError("the graph has no node list")
    if not nodes:
        raise GraphError("the graph has no nodes")
    for i, nd in enumerate(nodes):
        _check_node_dict(_label(i, nd), nd)
    if not isinstance(d.get("output"), str):
        raise GraphError("the graph names no output node")
    if "timesteps" in d and not _is_int(d["timesteps"]):
        raise GraphError(f"'timesteps' is a {type(d['timesteps']).__name__}, not an integer")
    if "method" in d and not isinstance(d["method"], str):
        raise GraphError(f"'method' is a {type(d['method']).__name__}, not a string")
    parts = d.get("output_parts")
    if parts is not None and not (isinstance(parts, list) and parts and all(
            isinstance(p, list) and all(_is_int(v) and v >= 1 for v in p) for p in parts)):
        raise GraphError("'output_parts' must be a non-empty list of shapes (lists of positive integers)")


def _check_node_dict(where: str, nd) -> None:
    """One node's dict: the fields and their container types (what is inside attrs and params is for
    :func:`check_declared`, once the node is built)."""
    if not isinstance(nd, dict):
        raise GraphError(f"{where} is a {type(nd).__name__}, not a dict")
    extra = [k for k in nd if k not in _NODE_FIELDS]
    if extra:
        raise GraphError(f"{where}: unknown field(s) {', '.join(map(repr, extra))}")
    for key, types, what in (("name", str, "a string"), ("op", str, "a string"),
                             ("inputs", list, "a list"), ("attrs", dict, "a dict"),
                             ("params", dict, "a dict"), ("shape", list, "a list"),
                             ("source", str, "a string")):
        if key in nd and not isinstance(nd[key], types):
            raise GraphError(f"{where}: field {key!r} is a {type(nd[key]).__name__}, not {what}")
    if "name" not in nd or "op" not in nd:
        raise GraphError(f"{where}: missing field {'name' if 'name' not in nd else 'op'!r}")
    if not nd["name"]:
        raise GraphError(f"{where}: empty name")
    if nd["op"] not in OPS:
        raise GraphError(f"{where}: unknown op {nd['op']!r}")
    if not all(isinstance(x, str) for x in nd.get("inputs", [])):
        raise GraphError(f"{where}: 'inputs' must hold node names (strings)")
    if not all(isinstance(k, str) for k in nd.get("attrs", {})):
        raise GraphError(f"{where}: attribute names must be strings")
    for k, v in nd.get("params", {}).items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise GraphError(f"{where}: param {k!r} is a {type(v).__name__}, not a tensor")
    if not all(_is_int(s) for s in nd.get("shape", [])):
        raise GraphError(f"{where}: 'shape' must hold integers")
    if "bdim" in nd and nd["bdim"] is not None and not _is_int(nd["bdim"]):
        raise GraphError(f"{where}: 'bdim' must be an integer or None")


def _arity(node: Node) -> tuple[int, int]:
    """(fewest, most) inputs of a node of this op: the op table's ``inputs``; a binary op without the scalar
    attr ``other`` reads two."""
    lo, hi = TABLE[node.op].arity
    if node.op in ("add", "sub", "mul", "div") and "other" not in node.attrs:
        lo = 2
    return lo, hi


def _check_tensor(where: str, key: str, t, *, floating: bool | None = None, dim: int | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise GraphError(f"{where}: param {key!r} is a {type(t).__name__}, not a tensor")
    if t.layout != torch.strided or t.is_quantized:
        raise GraphError(f"{where}: param {key!r} is not a dense tensor")
    if floating is True and not t.is_floating_point():
        raise GraphError(f"{where}: param {key!r} must be floating point, it is {t.dtype}")
    if floating is False and (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool):
        raise GraphError(f"{where}: param {key!r} must be an integer tensor, it is {t.dtype}")
    if dim is not None and t.dim() != dim:
        raise GraphError(f"{where}: param {key!r} must have {dim} dimension(s), it has shape {list(t.shape)}")


def nonfinite(t: torch.Tensor) -> int:
    """How many NaN/Inf values a tensor holds (0 for integer tensors)."""
    if not (t.is_floating_point() or t.is_complex()) or t.device.type == "meta" or not t.numel():
        return 0
    if bool(torch.isfinite(t.sum())):      # a finite sum means every value is finite (NaN/Inf propagate);
        return 0                           # an infinite one may be overflow: count exactly (8x the cost)
    return int((~torch.isfinite(t)).sum())


def _finite(where: str, key: str, t: torch.Tensor) -> None:
    bad = nonfinite(t)
    if bad:
        raise GraphError(f"{where}: param {key!r} holds NaN/Inf values ({bad} of {t.numel()})")


def _show(v) -> str:
    """A value of a file for a one-line message: its repr, cut at 60 characters."""
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def _names(keys) -> str:
    return ", ".join(_show(k) for k in keys)


def declaration(op: str, key: str) -> Attr | None:
    """The declaration of attribute ``key`` on a node of ``op`` (an op attribute or an annotation), or None."""
    return TABLE[op].attrs.get(key) or ANNOTATIONS.get(key)


def check_declared(where: str, node: Node) -> None:
    """The generic checks: ``node``'s attrs and params against the op table's declaration of its op.

    Refused: an attribute or parameter the table does not declare for the op (nor as an annotation), a
    required one missing, an attribute value outside its declared type, a parameter that is not a dense tensor,
    of the wrong dtype class or number of axes (or of values, where the declaration fixes it), or holding
    NaN/Inf. Unknown keys are refused rather than ignored: a saved model is untrusted input, and a key this
    version does not know is either damage (a typo such as ``alpah`` would silently change what the node
    computes) or the work of a newer sfn-deploy whose meaning this version would not honour; files of a newer
    format are refused by their ``format_version`` anyway, so a release that adds a key declares it here.
    """
    _check_declared_attrs(where, node)
    _check_declared_params(where, node)


def _check_declared_attrs(where: str, node: Node) -> None:
    spec, a = TABLE[node.op], node.attrs
    unknown = [k for k in a if declaration(node.op, k) is None]
    if unknown:
        raise GraphError(f"{where}: unknown attr(s) {_names(unknown)} (not declared for this op in the op table)")
    missing = [k for k, d in spec.attrs.items() if d.required and k not in a]
    if missing:
        raise GraphError(f"{where}: missing attr(s) {_names(missing)}")
    for k, v in a.items():
        d = declaration(node.op, k)
        if d is not None and not d.type.accepts(v):
            raise GraphError(f"{where}: attr {k!r} must be {d.type.says()}, got {_show(v)}")


def _check_declared_params(where: str, node: Node) -> None:
    spec, p = TABLE[node.op], node.params
    for k, t in p.items():
        _check_tensor(where, k, t)
    unknown = [k for k in p if k not in spec.params]
    if unknown:
        raise GraphError(f"{where}: unknown param(s) {_names(unknown)} (not declared for this op in the op table)")
    missing = [k for k, d in spec.params.items() if d.required and k not in p]
    if missing:
        raise GraphError(f"{where}: missing param(s) {_names(missing)}")
    for k, t in p.items():
        decl = spec.params[k]
        _check_tensor(where, k, t, floating={"float": True, "int": False}.get(decl.dtype),
                      dim=None if decl.axes is None else len(decl.axes))
        if decl.size is not None and t.numel() != decl.size:
            raise GraphError(f"{where}: param {k!r} must hold {decl.size} values, it holds {t.numel()}")
        _finite(where, k, t)


def _need_attrs(where: str, a: dict, keys) -> None:
    missing = [k for k in keys if k not in a]
    if missing:
        raise GraphError(f"{where}: missing attr(s) {', '.join(map(repr, missing))}")


def _in_range(where: str, a: dict, key: str, lo: float | None = None, hi: float | None = None,
              low_open: bool = False) -> None:
    """A number attr (its type checked by :func:`check_declared`) within [lo, hi] (or (lo, hi])."""
    v = a[key]
    if lo is not None and (v < lo or (low_open and v == lo)) or hi is not None and v > hi:
        raise GraphError(f"{where}: attr {key!r} = {v!r} is out of range")


def _check_neuron(where: str, node: Node) -> None:
    """What the declarations cannot say about an sfn / if_neuron site: increasing levels, λ in (0, 1], T ≥ 1,
    boundary and table sizes against the levels, ascending boundaries."""
    a, p = node.attrs, node.params
    levels = a["levels"]
    if not levels or not all(y > 0 for y in levels) or any(b <= c for c, b in zip(levels, levels[1:], strict=False)):
        raise GraphError(f"{where}: attr 'levels' must be a non-empty increasing list of positive integers")
    _in_range(where, a, "lam", 0.0, 1.0, low_open=True)
    if "T" in a and a["T"] < 1:
        raise GraphError(f"{where}: attr 'T' must be an integer ≥ 1, got {a['T']!r}")
    n = len(levels)
    for key in ("bounds_pos", "bounds_neg"):
        b = p[key]
        if b.numel() not in (0, n):
            raise GraphError(f"{where}: param {key!r} holds {b.numel()} boundaries for {n} levels")
        if b.numel() > 1 and b.device.type != "meta" and not bool((b[1:] >= b[:-1]).all()):
            raise GraphError(f"{where}: param {key!r} is not ascending")
    if p["table"].numel() != n + 1:
        raise GraphError(f"{where}: param 'table' must hold {n + 1} values (0 and the levels), "
                         f"it holds {p['table'].numel()}")


def _check_mbe(where: str, node: Node) -> None:
    """A node --method mbe runs in spiking form: its T ≥ 1, its ranges ≥ 0, and, on a host op, the attrs and
    fitted params that come with ``mbe_fn`` (each optional alone)."""
    a = node.attrs
    _need_attrs(where, a, ("mbe_fn", "T"))
    if a["T"] < 1:
        raise GraphError(f"{where}: attr 'T' must be an integer ≥ 1, got {a['T']!r}")
    if node.op == "mbe_neuron":
        _in_range(where, a, "amax", 0.0)
    if node.op == "layer_norm":
        _need_attrs(where, a, ("delta_amax",))
        _in_range(where, a, "delta_amax", 0.0)
    fits = [k for k, d in TABLE[node.op].params.items() if d.by == "mbe"]
    missing = [k for k in fits if k not in node.params]
    if missing:
        raise GraphError(f"{where}: missing param(s) {', '.join(map(repr, missing))}")


def _check_params(where: str, node: Node) -> None:
    """What the declarations cannot say about a weight layer's params: a bias of one value per output."""
    p = node.params
    for key in ("bias", "bias_ann"):
        if node.op in ("conv2d", "linear") and key in p and p[key].shape[0] != p["weight"].shape[0]:
            raise GraphError(f"{where}: param '{key}' has {p[key].shape[0]} entries for "
                             f"{p['weight'].shape[0]} outputs")


def _like(x: torch.Tensor, key: str, t: torch.Tensor) -> None:
    if t.dtype != x.dtype:
        raise ValueError(f"param {key!r} is {t.dtype}, its input {x.dtype}")


def _same(node: Node, args):
    x = args[0]
    if node.op == "softmax" and not -x.dim() <= node.attrs["dim"] < x.dim():
        raise ValueError(f"attr 'dim' {node.attrs['dim']!r} is no axis of its input")
    return list(x.shape), x.dtype


def _linear_shape(node: Node, args):
    x, w = args[0], node.params["weight"]          # (2-D, with a matching 1-D bias: _check_params)
    if x.dim() < 1 or x.shape[-1] != w.shape[1]:
        raise ValueError(f"its input has {x.shape[-1] if x.dim() else 0} features, the weight "
                         f"{list(w.shape)} takes {w.shape[1]}")
    for k in ("weight", "bias"):
        if k in node.params:
            _like(x, k, node.params[k])
    return list(x.shape[:-1]) + [w.shape[0]], x.dtype


def _pair(a: dict, key: str, least: int) -> list[int]:
    """An int[2] attr (its type checked by :func:`check_declared`) whose entries are ≥ ``least``."""
    v = a[key]
    if not all(i >= least for i in v):
        raise ValueError(f"attr {key!r} must be two integers ≥ {least}, got {v!r}")
    return v


def _conv2d_shape(node: Node, args):
    x, w, a = args[0], node.params["weight"], node.attrs       # (4-D weight, matching bias: _check_params)
    stride, padding, dilation = _pair(a, "stride", 1), _pair(a, "padding", 0), _pair(a, "dilation", 1)
    g = a["groups"]
    if g < 1 or w.shape[0] % g:
        raise ValueError(f"attr 'groups' {g!r} does not divide the {w.shape[0]} output channels")
    if x.dim() != 4:
        raise ValueError(f"its input has {x.dim()} axes, a 2-D convolution reads 4")
    if x.shape[1] != w.shape[1] * g:
        raise ValueError(f"its input has {x.shape[1]} channels, the weight {list(w.shape)} with groups {g} "
                         f"takes {w.shape[1] * g}")
    for k in ("weight", "bias"):
        if k in node.params:
            _like(x, k, node.params[k])
    out = [x.shape[0], w.shape[0]]
    for i in range(2):
        size = (x.shape[2 + i] + 2 * padding[i] - dilation[i] * (w.shape[2 + i] - 1) - 1) // stride[i] + 1
        if size < 1:
            raise ValueError(f"the kernel {list(w.shape[2:])} is larger than the padded input {list(x.shape[2:])}")
        out.append(size)
    return out, x.dtype


def _layer_norm_shape(node: Node, args):
    x, ns = args[0], node.attrs["normalized_shape"]
    if not ns:
        raise ValueError("attr normalized_shape is empty")
    if list(x.shape[x.dim() - len(ns):]) != ns:
        raise ValueError(f"normalized_shape {ns} does not end its input shape {list(x.shape)}")
    for k in ("weight", "bias"):
        if k in node.params:
            if list(node.params[k].shape) != ns:
                raise ValueError(f"param {k!r} has shape {list(node.params[k].shape)}, normalized_shape is {ns}")
            _like(x, k, node.params[k])
    return list(x.shape), x.dtype


def _batch_norm_shape(node: Node, args):
    x = args[0]
    if x.dim() < 2:
        raise ValueError("a batch norm reads an input with a channel axis")
    for k in ("running_mean", "running_var", "weight", "bias"):
        if k in node.params:
            if list(node.params[k].shape) != [x.shape[1]]:
                raise ValueError(f"param {k!r} has shape {list(node.params[k].shape)} for {x.shape[1]} channels")
            _like(x, k, node.params[k])
    return list(x.shape), x.dtype


def _broadcast(a, b) -> list[int]:
    """torch's broadcasting of two shapes (torch.broadcast_shapes imports sympy on first use)."""
    out = []
    for i in range(1, max(len(a), len(b)) + 1):
        x, y = (a[-i] if i <= len(a) else 1), (b[-i] if i <= len(b) else 1)
        if x != y and 1 not in (x, y):
            raise ValueError(f"shapes {list(a)} and {list(b)} do not broadcast")
        out.append(y if x == 1 else x)
    return out[::-1]


def _binary_shape(node: Node, args):
    x = args[0]
    other = args[1] if len(args) > 1 else node.attrs["other"]
    if isinstance(other, torch.Tensor):
        return _broadcast(x.shape, other.shape), torch.promote_types(x.dtype, other.dtype)
    return list(x.shape), x.dtype              # (a number: check_declared)


# Shape rules (torch's own, as (shape, dtype)) of the ops that carry weights or are the commonest: no arithmetic,
# so a big network validates in milliseconds. Every other op (layout, pooling, products, means) runs through
# the op table (ops.apply) on zero tensors of batch 1, which costs little. (Meta tensors would do the same without the
# arithmetic, but their first use imports torch._dynamo and sympy: ~1 s on every command that loads a model.)
_SHAPE_RULES = {"linear": _linear_shape, "conv2d": _conv2d_shape, "layer_norm": _layer_norm_shape,
                "batch_norm": _batch_norm_shape, "gelu": _same, "relu": _same, "softmax": _same,
                "add": _binary_shape, "sub": _binary_shape, "mul": _binary_shape, "div": _binary_shape}


def _zeros(shape, dtype=torch.float32) -> torch.Tensor:
    """A zero tensor of this shape that holds one element (a stride-0 view), so a value costs no memory."""
    return torch.zeros((), dtype=dtype).expand(list(shape))


def _shape_run(graph: Graph, where_of) -> None:
    """Run the ANN once on a zero input of batch 1 (shape rules for the weight layers and the commonest ops,
    the op table on zeros for the rest) and compare every node's output shape with its stored ``shape`` (the
    batch axis is not compared: a reshape that merges axes into it makes it k at batch 1)."""
    env: dict[str, torch.Tensor] = {}
    for node in graph.nodes:
        where = where_of(node)
        args = [env[i] for i in node.inputs]
        try:
            if node.op == "input":
                out = _zeros(node.shape)
            elif node.op == "constant":
                out = _zeros(node.params["value"].shape, node.params["value"].dtype)
            elif node.op in NEURON_OPS or node.op == "mbe_neuron":
                out = args[0]          # the ANN: identity, or the ReLU it absorbed (same shape)
            elif node.op in _SHAPE_RULES:
                shape, dtype = _SHAPE_RULES[node.op](node, args)
                out = _zeros(shape, dtype)
            else:
                out = apply(node, args, graph, 1)
        except KeyError as e:
            raise GraphError(f"{where}: missing attr {e.args[0]!r}") from None
        except Exception as e:  # wrong shapes, bad attr values: the rule or torch names the problem
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            shapes = ", ".join("×".join(map(str, a.shape)) for a in args)
            raise GraphError(f"{where}: cannot run on input shape(s) {shapes or '(none)'} ({msg})") from None
        if not isinstance(out, torch.Tensor):
            raise GraphError(f"{where}: does not compute a tensor")
        got, want = list(out.shape), list(node.shape)
        b = node.bdim
        if b is not None and not 0 <= b < len(want):
            raise GraphError(f"{where}: batch axis {b} outside its shape {want}")
        if len(got) != len(want) or any(g != w for i, (g, w) in enumerate(zip(got, want, strict=True)) if i != b):
            raise GraphError(f"{where}: computes shape {got} but the graph records {want} "
                             f"(a parameter or attribute of this node or an earlier one has the wrong shape)")
        env[node.name] = out


def _check_node(where: str, node: Node, seen: set[str], names: set[str]) -> None:
    """One node of :func:`validate_graph`, given the names of the nodes before it (``seen``) and of all."""
    if not isinstance(node.name, str) or not node.name:
        raise GraphError(f"a node has the name {node.name!r}")
    if node.name in seen:
        raise GraphError(f"{where}: the name is used twice")
    if node.op not in OPS:
        raise GraphError(f"{where}: unknown op")
    for i in node.inputs:
        if i not in seen:
            why = "which is the node itself (a cycle)" if i == node.name else \
                "which is a later node (a cycle)" if i in names else "which names no node (a dangling reference)"
            raise GraphError(f"{where}: reads {i!r}, {why}; inputs must name earlier nodes")
    lo, hi = _arity(node)
    if not lo <= len(node.inputs) <= hi:
        raise GraphError(f"{where}: has {len(node.inputs)} input(s), the op takes "
                         f"{lo if lo == hi else f'{lo} to {hi}'}")
    if not isinstance(node.attrs, dict) or not isinstance(node.params, dict):
        raise GraphError(f"{where}: attrs and params must be dicts")
    check_declared(where, node)
    _check_params(where, node)
    if node.op in NEURON_OPS:
        _check_neuron(where, node)
    if node.op == "mbe_neuron" or "mbe_fn" in node.attrs:
        _check_mbe(where, node)


def validate_graph(graph: Graph, shapes: bool = True) -> None:
    """Raise :class:`GraphError` naming the node when ``graph`` breaks the IR's rules.

    Checks: at least one node; exactly one ``input`` node; unique names; every input names an *earlier*
    node (no dangling or cyclic references) and each op has its number of inputs; the output names a
    node; every op is in :data:`OPS`; every node's attrs and params are those the op table declares, of the
    declared types (:func:`check_declared`), with finite parameter values; what the declarations cannot say
    (levels increasing, λ in (0, 1], T ≥ 1, boundary and table sizes, an MBE node's fits, bias sizes) is checked
    per op; and (``shapes``) one run of the ANN
    on a zero batch of 1 reproduces every node's stored shape, so a weight of the wrong shape is named
    here rather than failing inside an exporter. Cost: one pass over the parameters (the finite check)
    plus shape arithmetic (weight layers are never computed).
    """
    if not isinstance(graph.nodes, list) or not graph.nodes:
        raise GraphError("the graph has no nodes")
    seen: set[str] = set()
    names = {n.name for n in graph.nodes}
    inputs = 0

    def where_of(node: Node) -> str:
        return f"node {node.name!r} ({node.op})"

    for node in graph.nodes:
        _check_node(where_of(node), node, seen, names)
        inputs += node.op == "input"
        seen.add(node.name)
    if inputs != 1:
        raise GraphError(f"the graph has {inputs} input nodes; exactly one is required")
    if graph.output not in names:
        raise GraphError(f"the output names {graph.output!r}, which is no node of the graph")
    if not _is_int(graph.timesteps) or graph.timesteps < 1:
        raise GraphError(f"timesteps must be an integer ≥ 1, got {graph.timesteps!r}")
    if graph.output_parts is not None:
        out = graph[graph.output].shape
        width = sum(math.prod(p) for p in graph.output_parts)
        if len(out) != 2 or out[1] != width:
            raise GraphError(f"'output_parts' add up to {width} values per sample, but the output has shape {out}")
    if shapes:
        _shape_run(graph, where_of)
