"""Weight layers: convolutions and linear maps with stored weights, and products of two activations."""
from __future__ import annotations

import torch

from .builder import Unsupported, meta_shape, pair, rule
from .rows import conv1d_as_2d

aten = torch.ops.aten


@rule(aten.conv2d.default, aten.conv1d.default, aten.convolution.default, aten.conv2d.padding,
      aten.conv1d.padding)
def conv2d(b, n):
    args = n.args
    if n.target == aten.convolution.default:
        x, w, bias, stride, padding, dilation, transposed, _, groups = args
        if transposed:
            raise Unsupported("transposed convolution")
    else:
        x, w = args[0], args[1]
        one = n.target in (aten.conv1d.default, aten.conv1d.padding)
        rest = list(args[2:]) + [None] * 5
        bias = rest[0]
        stride, padding, dilation = rest[1] or [1] * (2 - one), rest[2] or [0] * (2 - one), rest[3] or [1] * (2 - one)
        groups = rest[4] or 1
    weight = b.param(w)
    if isinstance(padding, str):
        x, padding = _padding_by_name(b, n, x, weight, padding, dilation)
    params = {"weight": weight}
    if bias is not None:
        params["bias"] = b.param(bias)
    if weight.dim() == 3:
        return conv1d_as_2d(b, n, x, params, stride, padding, dilation, int(groups))
    if weight.dim() != 4:
        raise Unsupported("only 1-D and 2-D convolutions are supported")
    attrs = {"stride": pair(stride), "padding": pair(padding), "dilation": pair(dilation), "groups": int(groups)}
    return b.emit(n, "conv2d", [x], attrs, params, meta_shape(n))


def _padding_by_name(b, n, x, weight, padding: str, dilation):
    """padding="valid" is none; "same" (stride 1) pads dilation·(k − 1) per axis, the odd one after (torch's
    rule): symmetric amounts stay in the convolution, uneven ones become an explicit zero padding before it."""
    k = list(weight.shape[2:])
    if padding == "valid":
        return x, [0] * len(k)
    if padding != "same":
        raise Unsupported(f"padding={padding!r}")
    d = pair(dilation)[:len(k)]
    total = [di * (ki - 1) for di, ki in zip(d, k, strict=True)]
    before = [t // 2 for t in total]
    if all(t == 2 * p for t, p in zip(total, before, strict=True)):
        return x, before
    widths: list[int] = []
    for t, p in reversed(list(zip(total, before, strict=True))):     # F.pad's order: last axis first
        widths += [p, t - p]
    src = b.ir(x)
    shape = list(src.shape)
    for i, t in enumerate(total):
        shape[len(shape) - len(total) + i] += t
    padded = b.emit(n, "pad", [src], {"pad": widths, "value": 0.0}, {}, shape, name=n.name + "_same")
    return padded, [0] * len(k)


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
