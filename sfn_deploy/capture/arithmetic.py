"""Elementwise arithmetic between two values or a value and a scalar (residual sums, scalings)."""
from __future__ import annotations

import torch

from .builder import Unsupported, arg, meta_shape, rule

aten = torch.ops.aten

_BINARY = {aten.add.Tensor: "add", aten.add_.Tensor: "add", aten.sub.Tensor: "sub",
           aten.mul.Tensor: "mul", aten.mul_.Tensor: "mul", aten.div.Tensor: "div"}


@rule(*_BINARY)
def binary(b, n):
    op = _BINARY[n.target]
    x, y = n.args[0], n.args[1]
    alpha = n.kwargs.get("alpha", 1)
    if not isinstance(x, torch.fx.Node):
        if op not in ("add", "mul"):
            raise Unsupported("scalar on the left of a subtraction or division")
        x, y = y, x
    attrs = {"alpha": alpha} if alpha != 1 else {}
    if isinstance(y, torch.fx.Node):
        return b.emit(n, op, [x, y], attrs, {}, meta_shape(n))
    attrs["other"] = float(y)
    return b.emit(n, op, [x], attrs, {}, meta_shape(n))


@rule(aten.neg.default)
def neg(b, n):
    return b.emit(n, "mul", [n.args[0]], {"other": -1.0}, {}, meta_shape(n))


@rule(aten.addcmul.default)
def addcmul(b, n):
    """input + value · t1 · t2 (ResMLP's affine layers): a product and a sum."""
    x, t1, t2 = n.args[:3]
    value = float(arg(n, 3, "value", 1.0))
    shape = meta_shape(n)
    prod_shape = list(torch.broadcast_shapes(tuple(b.ir(t1).shape), tuple(b.ir(t2).shape)))
    p = b.emit(n, "mul", [t1, t2], {}, {}, prod_shape, name=n.name + "_mul")
    if value != 1.0:
        p = b.emit(n, "mul", [p], {"other": value}, {}, prod_shape, name=n.name + "_scale")
    return b.emit(n, "add", [x, p], {}, {}, shape)


@rule(aten.pow.Tensor_Scalar, aten.square.default)
def power(b, n):
    """x^p with a constant exponent (MetaFormer's StarReLU s·relu(x)² + b, hand-written RMS norms)."""
    exponent = 2.0 if n.target == aten.square.default else n.args[1]
    if not isinstance(exponent, (int, float)):
        raise Unsupported("a power whose exponent is not a constant")
    return b.emit(n, "pow", [n.args[0]], {"exponent": float(exponent)}, {}, meta_shape(n))
