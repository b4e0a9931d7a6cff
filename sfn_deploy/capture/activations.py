"""Pointwise nonlinearities. Each is a host op; an SFN goes on its output where a weight layer reads it."""
from __future__ import annotations

import torch

from .builder import Unsupported, arg, meta_shape, rule
from .layout import slice_node

aten = torch.ops.aten


@rule(aten.relu.default, aten.relu_.default)
def relu(b, n):
    return b.emit(n, "relu", [n.args[0]], {}, {}, meta_shape(n))


@rule(aten.gelu.default, aten.gelu_.default)
def gelu(b, n):
    return b.emit(n, "gelu", [n.args[0]], {"approximate": arg(n, 1, "approximate", "none")}, {}, meta_shape(n))


@rule(aten.softmax.int, aten._softmax.default)
def softmax(b, n):
    shape = meta_shape(n)
    return b.emit(n, "softmax", [n.args[0]], {"dim": n.args[1] % len(shape)}, {}, shape)


@rule(aten.log_softmax.int, aten._log_softmax.default)
def log_softmax(b, n):
    shape = meta_shape(n)
    return b.emit(n, "log_softmax", [n.args[0]], {"dim": n.args[1] % len(shape)}, {}, shape)


@rule(aten.hardtanh.default, aten.hardtanh_.default)
def hardtanh(b, n):
    lo, hi = float(arg(n, 1, "min_val", -1.0)), float(arg(n, 2, "max_val", 1.0))
    if lo == 0.0 and hi == float("inf"):
        return b.emit(n, "relu", [n.args[0]], {}, {}, meta_shape(n))
    return b.emit(n, "hardtanh", [n.args[0]], {"min_val": lo, "max_val": hi}, {}, meta_shape(n))


@rule(aten.relu6.default, aten.relu6_.default)
def relu6(b, n):
    return b.emit(n, "hardtanh", [n.args[0]], {"min_val": 0.0, "max_val": 6.0}, {}, meta_shape(n))


@rule(aten.clamp.default, aten.clamp_.default)
def clamp(b, n):
    lo, hi = arg(n, 1, "min"), arg(n, 2, "max")
    lo = float("-inf") if lo is None else float(lo)
    hi = float("inf") if hi is None else float(hi)
    if lo == 0.0 and hi == float("inf"):
        return b.emit(n, "relu", [n.args[0]], {}, {}, meta_shape(n))
    return b.emit(n, "hardtanh", [n.args[0]], {"min_val": lo, "max_val": hi}, {}, meta_shape(n))


@rule(aten.clamp_min.default, aten.clamp_min_.default)
def clamp_min(b, n):
    lo = float(n.args[1])
    op = "relu" if lo == 0.0 else "hardtanh"
    return b.emit(n, op, [n.args[0]], {} if op == "relu" else {"min_val": lo, "max_val": float("inf")}, {},
                  meta_shape(n))


@rule(aten.clamp_max.default, aten.clamp_max_.default)
def clamp_max(b, n):
    return b.emit(n, "hardtanh", [n.args[0]], {"min_val": float("-inf"), "max_val": float(n.args[1])}, {},
                  meta_shape(n))


@rule(aten.leaky_relu.default, aten.leaky_relu_.default)
def leaky_relu(b, n):
    return b.emit(n, "leaky_relu", [n.args[0]], {"negative_slope": float(arg(n, 1, "negative_slope", 0.01))}, {},
                  meta_shape(n))


@rule(aten.rrelu.default, aten.rrelu_.default)
def rrelu(b, n):
    """RReLU at inference: a leaky ReLU with the mean of its random slopes, (lower + upper) / 2."""
    if arg(n, 3, "training", False):
        raise Unsupported("RReLU in training mode (random slopes): export the model in eval mode")
    lower, upper = float(arg(n, 1, "lower", 1.0 / 8.0)), float(arg(n, 2, "upper", 1.0 / 3.0))
    return b.emit(n, "leaky_relu", [n.args[0]], {"negative_slope": (lower + upper) / 2.0}, {}, meta_shape(n))


@rule(aten.threshold.default, aten.threshold_.default)
def threshold(b, n):
    return b.emit(n, "threshold", [n.args[0]], {"threshold": float(n.args[1]), "value": float(n.args[2])}, {},
                  meta_shape(n))


@rule(aten.hardshrink.default)
def hardshrink(b, n):
    """x where |x| > λ, else 0: threshold(x, λ, 0) − threshold(−x, λ, 0)."""
    lam, shape = float(arg(n, 1, "lambd", 0.5)), meta_shape(n)
    pos = b.emit(n, "threshold", [n.args[0]], {"threshold": lam, "value": 0.0}, {}, shape, name=n.name + "_pos")
    neg = b.emit(n, "mul", [n.args[0]], {"other": -1.0}, {}, shape, name=n.name + "_negated")
    neg = b.emit(n, "threshold", [neg], {"threshold": lam, "value": 0.0}, {}, shape, name=n.name + "_neg")
    return b.emit(n, "sub", [pos, neg], {}, {}, shape)


@rule(aten.softshrink.default)
def softshrink(b, n):
    """x − clamp(x, −λ, λ): shrunk towards 0 by λ, 0 within it."""
    lam, shape = float(arg(n, 1, "lambd", 0.5)), meta_shape(n)
    inner = b.emit(n, "hardtanh", [n.args[0]], {"min_val": -lam, "max_val": lam}, {}, shape, name=n.name + "_clamp")
    return b.emit(n, "sub", [n.args[0], inner], {}, {}, shape)


@rule(aten.elu.default, aten.elu_.default, aten.celu.default, aten.celu_.default, aten.selu.default,
      aten.selu_.default)
def elu(b, n):
    """ELU family: x above 0, scale·α·(exp(x/α·input_scale) − 1) below (CELU: input_scale 1/α; SELU: fixed)."""
    if n.target in (aten.selu.default, aten.selu_.default):
        alpha, scale, input_scale = 1.6732632423543772, 1.0507009873554805, 1.0
    elif n.target in (aten.celu.default, aten.celu_.default):
        alpha = float(arg(n, 1, "alpha", 1.0))
        scale, input_scale = 1.0, 1.0 / alpha
    else:
        alpha, scale, input_scale = (float(arg(n, i, k, d)) for i, k, d in
                                     ((1, "alpha", 1.0), (2, "scale", 1.0), (3, "input_scale", 1.0)))
    return b.emit(n, "elu", [n.args[0]], {"alpha": alpha, "scale": scale, "input_scale": input_scale}, {},
                  meta_shape(n))


@rule(aten.prelu.default, aten._prelu_kernel.default)
def prelu(b, n):
    return b.emit(n, "prelu", [n.args[0]], {}, {"weight": b.param(n.args[1])}, meta_shape(n))


@rule(aten.softplus.default)
def softplus(b, n):
    return b.emit(n, "softplus", [n.args[0]], {"beta": float(arg(n, 1, "beta", 1.0)),
                                               "threshold": float(arg(n, 2, "threshold", 20.0))}, {}, meta_shape(n))


@rule(aten.log_sigmoid.default, aten.log_sigmoid_forward.default)
def log_sigmoid(b, n):
    """log σ(x) = −softplus(−x)."""
    shape = meta_shape(n, 0)
    neg = b.emit(n, "mul", [n.args[0]], {"other": -1.0}, {}, shape, name=n.name + "_neg")
    sp = b.emit(n, "softplus", [neg], {"beta": 1.0, "threshold": 20.0}, {}, shape, name=n.name + "_softplus")
    return b.emit(n, "mul", [sp], {"other": -1.0}, {}, shape)


@rule(aten.glu.default)
def glu(b, n):
    """GLU (gated convolutions, Conformer): the first half times σ(the second half) along ``dim``."""
    x = b.ir(n.args[0])
    d = int(arg(n, 1, "dim", -1)) % len(x.shape)
    half = x.shape[d] // 2
    shape = meta_shape(n) or []
    a = slice_node(b, n, x, d, 0, half, 1, shape, name=n.name + "_a")
    g = slice_node(b, n, x, d, half, 2 * half, 1, shape, name=n.name + "_b")
    gate = b.emit(n, "sigmoid", [g], {}, {}, shape, name=n.name + "_gate")
    return b.emit(n, "mul", [a, gate], {}, {}, shape)


def _pointwise(op: str, *targets):
    """A parameter-free pointwise nonlinearity mapped one to one onto IR op ``op``."""
    @rule(*targets)
    def handler(b, n):
        return b.emit(n, op, [n.args[0]], {}, {}, meta_shape(n))
    handler.__name__ = op
    return handler


hardswish = _pointwise("hardswish", aten.hardswish.default, aten.hardswish_.default)
hardsigmoid = _pointwise("hardsigmoid", aten.hardsigmoid.default, aten.hardsigmoid_.default)
silu = _pointwise("silu", aten.silu.default, aten.silu_.default)
sigmoid = _pointwise("sigmoid", aten.sigmoid.default, aten.sigmoid_.default)
tanh = _pointwise("tanh", aten.tanh.default, aten.tanh_.default)
mish = _pointwise("mish", aten.mish.default, aten.mish_.default)
absolute = _pointwise("abs", aten.abs.default, aten.abs_.default)
sign = _pointwise("sign", aten.sign.default, aten.sign_.default)
square_root = _pointwise("sqrt", aten.sqrt.default, aten.sqrt_.default)
reciprocal_square_root = _pointwise("rsqrt", aten.rsqrt.default, aten.rsqrt_.default)
