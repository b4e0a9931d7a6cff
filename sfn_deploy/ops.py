"""The op table: every IR op is one :class:`OpSpec` entry (kind, description, torch implementation).

This is the vocabulary of :mod:`sfn_deploy.ir` (``ir.OPS`` is derived from :data:`TABLE`) and the
arithmetic every executor shares: the reference interpreter, the op counter, the Lava host and
the NIR loader all call :func:`apply`, so an op computes the same bits everywhere. This module is
the base of the import graph: it imports nothing from the package.

Adding an op is adding one entry here::

    @register("hardtanh", "host", "clamp to [attrs min_val, attrs max_val]")
    def _hardtanh(node, args, graph, batch):
        return torch.clamp(args[0], node.attrs["min_val"], node.attrs["max_val"])

``kind`` is one of :data:`KINDS`. The implementation gets the node (``attrs``, ``params``), its
input values in order, the graph (only ``cat`` reads it: which inputs are batchless) and the
batch size (for shape attrs written with ``"B"``). Capture, the exporters and the counter learn
about the op from their own registries; an op without an implementation (``input``, ``constant``,
the neurons) is executed by the interpreter itself (:mod:`sfn_deploy.simulators.interpreter`).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# kind: "weight" (synaptic layer with stored weights), "product" (product of two activations), "neuron",
# "host" (computed off the neuron cores: normalisation, nonlinearities, residual arithmetic), "layout"
# (moves or selects data, no arithmetic), "pool", "io".
KINDS = ("io", "weight", "product", "neuron", "host", "pool", "layout")

Impl = Callable[..., torch.Tensor]          # (node, args, graph, batch) -> tensor


@dataclass(frozen=True)
class OpSpec:
    name: str
    kind: str
    description: str
    impl: Impl | None = None       # None: run by the interpreter (io, neurons)


TABLE: dict[str, OpSpec] = {}


def register(name: str, kind: str, description: str):
    """Decorator: add op ``name`` to the table with the decorated function as its implementation."""
    def add(fn: Impl) -> Impl:
        _insert(OpSpec(name, kind, description, fn))
        return fn
    return add


def declare(name: str, kind: str, description: str) -> None:
    """Add op ``name`` without an implementation: the interpreter runs it (io, neurons)."""
    _insert(OpSpec(name, kind, description, None))


def _insert(spec: OpSpec) -> None:
    if spec.kind not in KINDS:
        raise ValueError(f"op {spec.name!r}: unknown kind {spec.kind!r}")
    if spec.name in TABLE:
        raise ValueError(f"op {spec.name!r} is registered twice")
    TABLE[spec.name] = spec


def apply(node, args: list, graph, batch: int) -> torch.Tensor:
    """Compute ``node`` on its input values with the op's torch implementation."""
    spec = TABLE.get(node.op)
    if spec is None or spec.impl is None:
        raise NotImplementedError(f"the op table has no implementation for op {node.op!r} (node {node.name})")
    return spec.impl(node, args, graph, batch)


def resolve_shape(shape: list, batch: int) -> list[int]:
    """Replace the batch entries "B" / "B*k" of a stored shape by numbers."""
    out = []
    for s in shape:
        if isinstance(s, str):
            out.append(batch * (int(s.split("*")[1]) if "*" in s else 1))
        else:
            out.append(int(s))
    return out


def _other(args, a):
    """The second operand of a binary op: an input value, else the scalar attrs["other"]."""
    return args[1] if len(args) > 1 else a["other"]


# ---------------------------------------------------------------- io (run by the interpreter)

declare("input", "io", "the network input")
declare("constant", "io", "a stored tensor used as data (class token, position embedding)")


# ---------------------------------------------------------------- weight layers and products

@register("conv2d", "weight", "2-D convolution; attrs stride, padding, dilation, groups")
def _conv2d(node, args, graph, batch):
    a, p = node.attrs, node.params
    return F.conv2d(args[0], p["weight"], p.get("bias"), a["stride"], a["padding"], a["dilation"], a["groups"])


@register("linear", "weight", "y = x Wᵀ + b over the last axis")
def _linear(node, args, graph, batch):
    return F.linear(args[0], node.params["weight"], node.params.get("bias"))


@register("matmul", "product", "product of two activations (attention q·kᵀ and attn·v)")
def _matmul(node, args, graph, batch):
    return torch.matmul(args[0], args[1])


# ---------------------------------------------------------------- neurons (run by the interpreter's neuron kinds)

declare("sfn", "neuron", "Scale-and-Fire neuron, one timestep")
declare("if_neuron", "neuron", "multi-level integrate-and-fire neuron over T timesteps, soft reset (baselines)")
declare("mbe_neuron", "neuron", "MBE identity neuron: binary encoding of x over T internal steps (--method mbe)")


# ---------------------------------------------------------------- host

@register("relu", "host", "max(0, x); in a converted network it only feeds SFNs")
def _relu(node, args, graph, batch):
    return torch.relu(args[0])


@register("gelu", "host", "GELU; attrs approximate")
def _gelu(node, args, graph, batch):
    return F.gelu(args[0], approximate=node.attrs.get("approximate", "none"))


@register("softmax", "host", "softmax over attrs dim")
def _softmax(node, args, graph, batch):
    return torch.softmax(args[0], node.attrs["dim"])


@register("layer_norm", "host", "LayerNorm over the last len(normalized_shape) axes")
def _layer_norm(node, args, graph, batch):
    a, p = node.attrs, node.params
    return F.layer_norm(args[0], a["normalized_shape"], p.get("weight"), p.get("bias"), a["eps"])


@register("batch_norm", "host", "inference BatchNorm not foldable into a convolution")
def _batch_norm(node, args, graph, batch):
    a, p = node.attrs, node.params
    return F.batch_norm(args[0], p["running_mean"], p["running_var"], p.get("weight"), p.get("bias"),
                        False, 0.0, a["eps"])


def _alpha_other(node, args):
    a = node.attrs
    other, alpha = _other(args, a), a.get("alpha", 1)
    if not (type(alpha) is int and alpha == 1 and isinstance(other, torch.Tensor) and other.is_floating_point()):
        other = alpha * other      # (1 · t is t bit for bit, same dtype: that pass is skipped)
    return other


@register("add", "host", "a + alpha·b (tensor or attrs scalar)")
def _add(node, args, graph, batch):
    return args[0] + _alpha_other(node, args)


@register("sub", "host", "a − b")
def _sub(node, args, graph, batch):
    return args[0] - _alpha_other(node, args)


@register("mul", "host", "a · b")
def _mul(node, args, graph, batch):
    return args[0] * _other(args, node.attrs)


@register("div", "host", "a / b")
def _div(node, args, graph, batch):
    return args[0] / _other(args, node.attrs)


# ---------------------------------------------------------------- pooling

@register("max_pool2d", "pool", "2-D max pooling")
def _max_pool2d(node, args, graph, batch):
    a = node.attrs
    return F.max_pool2d(args[0], a["kernel_size"], a["stride"], a["padding"], a["dilation"], a["ceil_mode"])


@register("avg_pool2d", "pool", "2-D average pooling")
def _avg_pool2d(node, args, graph, batch):
    a = node.attrs
    return F.avg_pool2d(args[0], a["kernel_size"], a["stride"], a["padding"], a["ceil_mode"],
                        a["count_include_pad"], a.get("divisor_override"))


@register("adaptive_avg_pool2d", "pool", "adaptive 2-D average pooling")
def _adaptive_avg_pool2d(node, args, graph, batch):
    return F.adaptive_avg_pool2d(args[0], node.attrs["output_size"])


@register("mean", "pool", "mean over attrs dims")
def _mean(node, args, graph, batch):
    return args[0].mean(node.attrs["dims"], keepdim=node.attrs["keepdim"])


# ---------------------------------------------------------------- layout

@register("reshape", "layout", "reshape to attrs shape")
def _reshape(node, args, graph, batch):
    return args[0].reshape(resolve_shape(node.attrs["shape"], batch))


@register("permute", "layout", "permute axes")
def _permute(node, args, graph, batch):
    return args[0].permute(node.attrs["dims"])


@register("transpose", "layout", "swap two axes")
def _transpose(node, args, graph, batch):
    return args[0].transpose(node.attrs["dim0"], node.attrs["dim1"])


@register("flatten", "layout", "flatten axes start..end")
def _flatten(node, args, graph, batch):
    return args[0].flatten(node.attrs["start"], node.attrs["end"])


@register("unsqueeze", "layout", "insert an axis")
def _unsqueeze(node, args, graph, batch):
    return args[0].unsqueeze(node.attrs["dim"])


@register("squeeze", "layout", "remove size-1 axes")
def _squeeze(node, args, graph, batch):
    return args[0].squeeze(node.attrs["dims"])


@register("select", "layout", "pick one index along an axis")
def _select(node, args, graph, batch):
    return args[0].select(node.attrs["dim"], node.attrs["index"])


@register("slice", "layout", "a strided range along an axis")
def _slice(node, args, graph, batch):
    a = node.attrs
    return args[0][(slice(None),) * a["dim"] + (slice(a["start"], a["end"], a["step"]),)]


@register("cat", "layout", "concatenate along an axis (batchless inputs broadcast over the batch)")
def _cat(node, args, graph, batch):
    """Batchless inputs (``graph[name].bdim is None``: constants) are broadcast over the batch first."""
    parts = []
    for name, t in zip(node.inputs, args, strict=True):
        if graph[name].bdim is None and node.bdim is not None and t.shape[node.bdim] != batch:
            shape = list(t.shape)
            shape[node.bdim] = batch
            t = t.expand(shape)
        parts.append(t)
    return torch.cat(parts, node.attrs["dim"])


@register("expand", "layout", "broadcast to attrs shape")
def _expand(node, args, graph, batch):
    return args[0].expand(resolve_shape(node.attrs["shape"], batch))


# ---------------------------------------------------------------- the model zoo's operators

@register("hardtanh", "host", "clamp to [attrs min_val, attrs max_val] (ReLU6)")
def _hardtanh(node, args, graph, batch):
    return torch.clamp(args[0], node.attrs["min_val"], node.attrs["max_val"])


@register("hardswish", "host", "x · relu6(x + 3) / 6")
def _hardswish(node, args, graph, batch):
    return F.hardswish(args[0])


@register("hardsigmoid", "host", "relu6(x + 3) / 6")
def _hardsigmoid(node, args, graph, batch):
    return F.hardsigmoid(args[0])


@register("silu", "host", "x · sigmoid(x) (Swish)")
def _silu(node, args, graph, batch):
    return F.silu(args[0])


@register("sigmoid", "host", "1 / (1 + exp(−x))")
def _sigmoid(node, args, graph, batch):
    return torch.sigmoid(args[0])


@register("tanh", "host", "tanh(x)")
def _tanh(node, args, graph, batch):
    return torch.tanh(args[0])


@register("mish", "host", "x · tanh(softplus(x))")
def _mish(node, args, graph, batch):
    return F.mish(args[0])


@register("group_norm", "host", "GroupNorm: attrs num_groups, eps; params weight, bias (per channel)")
def _group_norm(node, args, graph, batch):
    a, p = node.attrs, node.params
    return F.group_norm(args[0], a["num_groups"], p.get("weight"), p.get("bias"), a["eps"])


@register("vector_norm", "host", "the attrs ord-norm (1 or 2) over attrs dims")
def _vector_norm(node, args, graph, batch):
    a = node.attrs
    return torch.linalg.vector_norm(args[0], a["ord"], a["dims"], keepdim=a["keepdim"])


@register("sum", "pool", "sum over attrs dims")
def _sum(node, args, graph, batch):
    return args[0].sum(node.attrs["dims"], keepdim=node.attrs["keepdim"])


@register("pad", "layout", "constant padding: attrs pad (F.pad order: last axis first), value")
def _pad(node, args, graph, batch):
    return F.pad(args[0], node.attrs["pad"], "constant", node.attrs["value"])


@register("roll", "layout", "cyclic shift: attrs shifts along attrs dims (shifted windows)")
def _roll(node, args, graph, batch):
    return torch.roll(args[0], node.attrs["shifts"], node.attrs["dims"])
