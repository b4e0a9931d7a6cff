"""Elementwise arithmetic between two values or a value and a scalar (residual sums, scalings)."""
from __future__ import annotations

import torch

from .builder import Unsupported, meta_shape, rule

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
