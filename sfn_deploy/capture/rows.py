"""1-D layers (Conv1d, MaxPool1d, AvgPool1d, AdaptiveAvgPool1d: keyword spotting, ECG, any signal) run as their
2-D forms over one row, so every backend and the counter need nothing new: the rules wrap each in an unsqueeze
and a squeeze of a row axis, and :func:`keep_rows` then drops the squeeze–unsqueeze pairs between them, so the
activations in between (where the SFNs go) stay batch × channels × 1 × length."""
from __future__ import annotations

import torch

from ..ir import Graph, Node
from .builder import Unsupported, meta_shape, pair, rule

aten = torch.ops.aten

# ops that act elementwise (or per channel, axis 1) whatever the rank: a row axis may be inserted under them
_ROW_FREE = {"relu", "hardtanh", "leaky_relu", "gelu", "silu", "sigmoid", "tanh", "hardswish", "hardsigmoid", "mish",
             "batch_norm"}


def as_rows(b, n, x):
    """A batch × channels × length value as batch × channels × 1 × length (1-D layers run as their 2-D forms, so
    every backend and the counter need nothing new); ``from_rows`` takes the row axis away again."""
    x = x if isinstance(x, Node) else b.ir(x)
    if len(x.shape) != 3 or x.bdim != 0:
        raise Unsupported("a 1-D layer on a value that is not batch × channels × length")
    return b.emit(n, "unsqueeze", [x], {"dim": 2}, {}, [x.shape[0], x.shape[1], 1, x.shape[2]], 0,
                  name=n.name + "_rows")


def from_rows(b, n, y):
    shape = meta_shape(n)
    return b.emit(n, "squeeze", [y], {"dims": [2]}, {}, shape, 0)


def conv1d_as_2d(b, n, x, params, stride, padding, dilation, groups: int):
    """Conv1d (keyword spotting, ECG, any signal) as a Conv2d over one row: kernel 1 × K."""
    w = params["weight"]
    params = {**params, "weight": w.unsqueeze(2)}
    attrs = {"stride": [1, pair(stride)[0]], "padding": [0, pair(padding)[0]], "dilation": [1, pair(dilation)[0]],
             "groups": groups}
    out = meta_shape(n) or []
    y = b.emit(n, "conv2d", [as_rows(b, n, x)], attrs, params, [out[0], out[1], 1, out[2]], 0,
               name=n.name + "_2d")
    return from_rows(b, n, y)


@rule(aten.max_pool1d.default, aten.max_pool1d_with_indices.default)
def max_pool1d(b, n):
    args, out = n.args, meta_shape(n, 0)
    k = pair(args[1])[0]
    stride = pair(args[2])[0] if len(args) > 2 and args[2] else k
    attrs = {"kernel_size": [1, k], "stride": [1, stride], "padding": [0, pair(args[3] if len(args) > 3 else 0)[0]],
             "dilation": [1, pair(args[4] if len(args) > 4 else 1)[0]],
             "ceil_mode": bool(args[5]) if len(args) > 5 else False}
    y = b.emit(n, "max_pool2d", [as_rows(b, n, args[0])], attrs, {}, [out[0], out[1], 1, out[2]], 0,
               name=n.name + "_2d")
    return from_rows(b, n, y)


@rule(aten.avg_pool1d.default)
def avg_pool1d(b, n):
    args, out = n.args, meta_shape(n)
    k = pair(args[1])[0]
    stride = pair(args[2])[0] if len(args) > 2 and args[2] else k
    attrs = {"kernel_size": [1, k], "stride": [1, stride], "padding": [0, pair(args[3] if len(args) > 3 else 0)[0]],
             "ceil_mode": bool(args[4]) if len(args) > 4 else False,
             "count_include_pad": bool(args[5]) if len(args) > 5 else True, "divisor_override": None}
    y = b.emit(n, "avg_pool2d", [as_rows(b, n, args[0])], attrs, {}, [out[0], out[1], 1, out[2]], 0,
               name=n.name + "_2d")
    return from_rows(b, n, y)


@rule(aten.adaptive_avg_pool1d.default)
def adaptive_avg_pool1d(b, n):
    out = meta_shape(n)
    y = b.emit(n, "adaptive_avg_pool2d", [as_rows(b, n, n.args[0])], {"output_size": [1, pair(n.args[1])[0]]}, {},
               [out[0], out[1], 1, out[2]], 0, name=n.name + "_2d")
    return from_rows(b, n, y)


def keep_rows(graph: Graph) -> Graph:
    """Remove each squeeze of the row axis whose value reaches, through ops of :data:`_ROW_FREE` (and scalar
    add/sub/mul/div), only unsqueezes of it (removed too) or flattens of channels and length (which flatten the
    rows form to the same order): the ops in between then compute on the rows form."""
    changed = True
    while changed:
        changed = False
        users = graph.users()
        for s in [n for n in graph.nodes if n.op == "squeeze" and n.attrs["dims"] == [2] and len(n.shape) == 3]:
            region, unsqueezes, flattens, todo, ok = [s], [], [], [s], True
            while todo and ok:
                for u in users[todo.pop().name]:
                    if u.op == "unsqueeze" and u.attrs["dim"] == 2:
                        unsqueezes.append(u)
                    elif u.op == "flatten" and u.attrs["start"] == 1 and u.attrs["end"] == 2:
                        flattens.append(u)
                    elif (u.op in _ROW_FREE or (u.op in ("add", "sub", "mul", "div") and len(u.inputs) == 1)) \
                            and u.name != graph.output and u not in region:
                        region.append(u)
                        todo.append(u)
                    else:
                        ok = False
            if not ok or not (unsqueezes or flattens):
                continue
            for n in region[1:]:
                n.shape = n.shape[:2] + [1] + n.shape[2:]
            for f in flattens:
                f.attrs["end"] = 3
            graph.replace_uses(s.name, s.inputs[0])
            for e in unsqueezes:
                graph.replace_uses(e.name, e.inputs[0])
            for n in [s, *unsqueezes]:
                graph.remove(n.name)
            changed = True
            break
    return graph
