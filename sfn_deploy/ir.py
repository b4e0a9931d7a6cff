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

The ``sfn`` node is the Scale-and-Fire neuron (SPEC §4), one timestep:

    o = λθ⁺ · y⁺(x)  for x ≥ 0,   o = −λθ⁻ · y⁻(−x)  for x < 0
    y(u) = y_i where b_i ≤ u < b_{i+1};  0 below b_1;  y_N at and above b_N

attrs: kind ("dual" or "softmax"), fire, M, levels (y_1..y_N), rounding, lam (λ),
theta_pos, theta_neg (θ⁻ = 0 disables the negative branch), o_max (softmax sites),
role (where it sits: post-relu, pre-qkv, q, k, v, post-softmax, ...).
params (derived by :func:`sfn_deploy.passes.configure`): bounds_pos, bounds_neg
(float32 absolute boundaries), steps (float32 [λθ⁺, λθ⁻]), table (int64 [0, y_1..y_N]).
Backends use these stored float32 values, so all of them fire at the same inputs.

The ``if_neuron`` node is a multi-level integrate-and-fire neuron run over ``T`` synchronous
timesteps (the baselines of docs/methods.md: rate-coded IF, ECMT's multi-threshold neuron).
It fires by the same attrs and params as ``sfn`` (levels, θ±, λ, bounds, steps, table), applied
to its membrane potential instead of its input, and resets by subtraction:

    m(t) = v(t−1) + x(t);  o(t) = sfn-rule(m(t));  v(t) = m(t) − o(t);  v(0) = v0 · step⁺

extra attrs: method ("if", "ecmt"), T (timesteps), v0 (initial potential in units of the
positive step). A graph holding such nodes runs T steps (``Graph.timesteps``,
:mod:`sfn_deploy.temporal`); its output is the mean of the T output values. Single-timestep
consumers (the ONNX/NIR/Lava exporters) refuse it (:func:`sfn_deploy.methods.require_single_step`).
``Graph.method`` names the conversion method ("sfn" for files written before methods existed).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

FORMAT = "sfn-deploy/converted"
FORMAT_VERSION = 2         # 2: multi-timestep methods (if_neuron, Graph.timesteps/method); files with
                           # only single-step SFN content are still written as version 1

# op -> (kind, description). kind: "weight" (synaptic layer with stored weights),
# "product" (product of two activations), "neuron", "host" (computed off the neuron
# cores: normalisation, nonlinearities, residual arithmetic), "layout" (moves or
# selects data, no arithmetic), "pool", "io".
OPS = {
    "input": ("io", "the network input"),
    "constant": ("io", "a stored tensor used as data (class token, position embedding)"),
    "conv2d": ("weight", "2-D convolution; attrs stride, padding, dilation, groups"),
    "linear": ("weight", "y = x Wᵀ + b over the last axis"),
    "matmul": ("product", "product of two activations (attention q·kᵀ and attn·v)"),
    "sfn": ("neuron", "Scale-and-Fire neuron, one timestep"),
    "if_neuron": ("neuron", "multi-level integrate-and-fire neuron over T timesteps, soft reset (baselines)"),
    "mbe_neuron": ("neuron", "MBE identity neuron: binary encoding of x over T internal steps (--method mbe)"),
    "relu": ("host", "max(0, x); in a converted network it only feeds SFNs"),
    "gelu": ("host", "GELU; attrs approximate"),
    "softmax": ("host", "softmax over attrs dim"),
    "layer_norm": ("host", "LayerNorm over the last len(normalized_shape) axes"),
    "batch_norm": ("host", "inference BatchNorm not foldable into a convolution"),
    "add": ("host", "a + alpha·b (tensor or attrs scalar)"),
    "sub": ("host", "a − b"),
    "mul": ("host", "a · b"),
    "div": ("host", "a / b"),
    "max_pool2d": ("pool", "2-D max pooling"),
    "avg_pool2d": ("pool", "2-D average pooling"),
    "adaptive_avg_pool2d": ("pool", "adaptive 2-D average pooling"),
    "mean": ("pool", "mean over attrs dims"),
    "reshape": ("layout", "reshape to attrs shape"),
    "permute": ("layout", "permute axes"),
    "transpose": ("layout", "swap two axes"),
    "flatten": ("layout", "flatten axes start..end"),
    "unsqueeze": ("layout", "insert an axis"),
    "squeeze": ("layout", "remove size-1 axes"),
    "select": ("layout", "pick one index along an axis"),
    "slice": ("layout", "a strided range along an axis"),
    "cat": ("layout", "concatenate along an axis (batchless inputs broadcast over the batch)"),
    "expand": ("layout", "broadcast to attrs shape"),
}


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
    def from_dict(cls, d: dict) -> "Node":
        return cls(**d)


@dataclass
class Graph:
    nodes: list[Node]
    output: str
    timesteps: int = 1          # T: synchronous steps per inference (1 for SFN)
    method: str = "sfn"         # the conversion method (docs/methods.md)

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
        return {"nodes": [n.to_dict() for n in self.nodes], "output": self.output, "timesteps": self.timesteps,
                "method": self.method}

    @classmethod
    def from_dict(cls, d: dict) -> "Graph":
        return cls([Node.from_dict(n) for n in d["nodes"]], d["output"], int(d.get("timesteps", 1)),
                   str(d.get("method", "sfn")))


def resolve_shape(shape: list, batch: int) -> list[int]:
    """Replace the batch entries "B" / "B*k" of a stored shape by numbers."""
    out = []
    for s in shape:
        if isinstance(s, str):
            out.append(batch * (int(s.split("*")[1]) if "*" in s else 1))
        else:
            out.append(int(s))
    return out
