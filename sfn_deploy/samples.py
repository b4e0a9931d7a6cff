"""Where one sample's values sit in a batched tensor of the IR.

A node's batch axis (``bdim``) is not always first, and it may hold several items per sample: Swin's windows and
the heads of folded attention are folded in *after* the batch (``B*k``: sample-major), nn.MultiheadAttention's
sequence-first ``view(tgt_len * bsz, embed)`` folds the tokens in *before* it (``outer`` = tgt_len items of the
axis come before the batch). One sample's values, in the order the node holds them at batch size 1 (what a
backend running one sample at a time, such as Lava, sees), are then the axis split as (outer, batch, k / outer)
with the batch moved first. Backends that record levels per sample (torch, ONNX, the Lava integer reference)
rearrange with :func:`sample_rows`, so their rows compare with Lava's one to one.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .ir import Graph, Node

_RESHAPES = {"reshape", "flatten", "unsqueeze", "squeeze"}     # row-major order kept: the items before the batch too


def sample_layout(graph: Graph) -> dict[str, tuple[int, int]]:
    """{node: (batch axis, items of that axis before the batch)} for every batched node. A reshape keeps the
    row-major order, so the items before the batch stay the same count and the new ``outer`` is that count over
    the axes before the new batch axis; any other op moves axes whole, and keeps its input's."""
    out: dict[str, tuple[int, int]] = {}
    for n in graph:
        if n.bdim is None:
            continue
        src = next((graph[i] for i in n.inputs if graph[i].bdim is not None and i in out), None)
        if src is None:
            out[n.name] = (n.bdim, 1)
            continue
        p, o = out[src.name]
        if n.op in _RESHAPES:
            before = math.prod(src.shape[:p]) * o
            o = before // max(math.prod(n.shape[:n.bdim]), 1)
        out[n.name] = (n.bdim, max(o, 1))
    return out


def regular(node: Node) -> bool:
    """One sample per index of a first batch axis: rows of a batched tensor are samples."""
    return node.bdim == 0 and (not node.shape or node.shape[0] == 1)


def sample_rows(t, node: Node, layout: tuple[int, int]):
    """(batch, values of one sample) of a batched tensor or array ``t`` of ``node``, each row in the node's
    order at batch size 1."""
    p, outer = layout
    k = node.shape[p]
    batch = t.shape[p] // k
    inner = k // outer
    split = (*t.shape[:p], outer, batch, inner, *t.shape[p + 1:])
    if isinstance(t, np.ndarray):
        return np.moveaxis(t.reshape(split), p + 1, 0).reshape(batch, -1)
    if isinstance(t, torch.Tensor):
        return t.reshape(split).movedim(p + 1, 0).reshape(batch, -1)
    raise TypeError(type(t))


class Rows:
    """Per-sample rows of a graph's site tensors: a plain reshape where the batch is the first axis, else
    :func:`sample_rows`."""

    def __init__(self, graph: Graph):
        self.graph = graph
        self.layout = sample_layout(graph) if not all(regular(s) for s in graph.sites) else {}

    def __call__(self, name: str, t):
        node = self.graph[name]
        if regular(node):
            return t.reshape(t.shape[0], -1)
        return sample_rows(t, node, self.layout[name])
