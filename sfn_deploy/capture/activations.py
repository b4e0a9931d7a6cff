"""Pointwise nonlinearities. Each is a host op; an SFN goes on its output where a weight layer reads it."""
from __future__ import annotations

import torch

from .builder import arg, meta_shape, rule

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
