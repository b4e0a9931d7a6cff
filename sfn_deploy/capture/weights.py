"""Weight layers: convolutions and linear maps with stored weights, and products of two activations."""
from __future__ import annotations

import torch

from .builder import Unsupported, meta_shape, pair, rule
from .rows import conv1d_as_2d

aten = torch.ops.aten


@rule(aten.conv2d.default, aten.conv1d.default, aten.convolution.default)
def conv2d(b, n):
    args = n.args
    if n.target == aten.convolution.default:
        x, w, bias, stride, padding, dilation, transposed, _, groups = args
        if transposed:
            raise Unsupported("transposed convolution")
    else:
        x, w = args[0], args[1]
        one = n.target == aten.conv1d.default
        rest = list(args[2:]) + [None] * 5
        bias = rest[0]
        stride, padding, dilation = rest[1] or [1] * (2 - one), rest[2] or [0] * (2 - one), rest[3] or [1] * (2 - one)
        groups = rest[4] or 1
    if isinstance(padding, str):
        raise Unsupported(f"padding={padding!r}; export with numeric padding")
    weight = b.param(w)
    params = {"weight": weight}
    if bias is not None:
        params["bias"] = b.param(bias)
    if weight.dim() == 3:
        return conv1d_as_2d(b, n, x, params, stride, padding, dilation, int(groups))
    if weight.dim() != 4:
        raise Unsupported("only 1-D and 2-D convolutions are supported")
    attrs = {"stride": pair(stride), "padding": pair(padding), "dilation": pair(dilation), "groups": int(groups)}
    return b.emit(n, "conv2d", [x], attrs, params, meta_shape(n))


@rule(aten.linear.default)
def linear(b, n):
    params = {"weight": b.param(n.args[1])}
    if len(n.args) > 2 and n.args[2] is not None:
        params["bias"] = b.param(n.args[2])
    return b.emit(n, "linear", [n.args[0]], {}, params, meta_shape(n))


@rule(aten.matmul.default, aten.bmm.default, aten.mm.default)
def matmul(b, n):
    x, y = n.args[0], n.args[1]
    if b.is_param(y) and b.state[y.name].dim() == 2:
        return b.emit(n, "linear", [x], {}, {"weight": b.stored(y.name).t().contiguous()}, meta_shape(n))
    if b.is_param(x) or b.is_param(y):
        raise Unsupported("product with a stored tensor that is not a 2-D weight matrix")
    return b.emit(n, "matmul", [x, y], {}, {}, meta_shape(n))


@rule(aten.addmm.default)
def addmm(b, n):
    bias, x, w = n.args[0], n.args[1], n.args[2]
    params = {"weight": b.param(w).t().contiguous(), "bias": b.param(bias)}
    return b.emit(n, "linear", [x], {}, params, meta_shape(n))
