"""1-D layers (Conv1d, MaxPool1d, AvgPool1d, AdaptiveAvgPool1d: keyword spotting, ECG, any signal) run as their
2-D forms over one row, so every backend and the counter need nothing new: the rules wrap each in an unsqueeze
and a squeeze of a row axis, and :func:`keep_rows` then drops the squeeze–unsqueeze pairs between them, so the
activations in between (where the SFNs go) stay batch × channels × 1 × length."""
from __future__ import annotations

import torch

from ..ir import Graph, Node
from .builder import Unsupported, meta_shape, pair, rule
from .pooling import avg_pool_attrs, max_pool_attrs

aten = torch.ops.aten

# ops that act elementwise (or per channel, axis 1) whatever the rank: a row axis may be inserted under them
_ROW_FREE = {"relu", "hardtanh", "leaky_relu", "gelu", "silu", "sigmoid", "tanh", "hardswish", "hardsigmoid", "mish",
             "batch_norm"}


def as_rows(b, n, x):
    """A batch × channels × length value as batch × channels × 1 × length."""
    x = x if isinstance(x, Node) else b.ir(x)
    if len(x.shape) != 3 or x.bdim != 0:
        raise Unsupported("a 1-D layer on a value that is not batch × channels × length")
    return b.emit(n, "unsqueeze", [x], {"dim": 2}, {}, [x.shape[0], x.shape[1], 1, x.shape[2]], 0,
                  name=n.name + "_rows")


def one_row(b, n, op: str, x, attrs: dict, params: dict | None = None):
    """The 2-D ``op`` over x's rows form, then the row axis squeezed away again."""
    out = meta_shape(n, 0) or []
    y = b.emit(n, op, [as_rows(b, n, x)], attrs, params or {}, [out[0], out[1], 1, out[2]], 0, name=n.name + "_2d")
    return b.emit(n, "squeeze", [y], {"dims": [2]}, {}, out, 0)


def _row_window(attrs: dict) -> dict:
    """2-D window attrs parsed from 1-D arguments (each pair [v, v]) as one row: [1, v] ([0, v] for padding)."""
    return {k: [0 if k == "padding" else 1, v[1]] if k in _WINDOW else v for k, v in attrs.items()}


_WINDOW = ("kernel_size", "stride", "padding", "dilation")


def conv1d_as_2d(b, n, x, params, stride, padding, dilation, groups: int):
    """Conv1d (keyword spotting, ECG, any signal) as a Conv2d over one row: kernel 1 × K."""
    attrs = _row_window({"stride": pair(stride), "padding": pair(padding), "dilation": pair(dilation)})
    return one_row(b, n, "conv2d", x, {**attrs, "groups": groups}, {**params, "weight": params["weight"].unsqueeze(2)})


@rule(aten.max_pool1d.default, aten.max_pool1d_with_indices.default)
def max_pool1d(b, n):
    return one_row(b, n, "max_pool2d", n.args[0], _row_window(max_pool_attrs(n.args)))


@rule(aten.avg_pool1d.default)
def avg_pool1d(b, n):
    return one_row(b, n, "avg_pool2d", n.args[0], _row_window(avg_pool_attrs(n.args)))


@rule(aten.adaptive_avg_pool1d.default)
def adaptive_avg_pool1d(b, n):
    return one_row(b, n, "adaptive_avg_pool2d", n.args[0], {"output_size": [1, pair(n.args[1])[0]]})


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
