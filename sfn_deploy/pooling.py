"""Average pooling of a site's spikes read by weight layers: which poolings fold into those layers' weights, and
which can run instead as a pooling layer of graded neurons (a window sum of ones, divided by one count).

One graph fact for the two places that need it: the Lava lowering builds either form
(exporters/lava/plan.py, ``--avg-pool``) and the op counter counts both, so a graded target's report prices
exactly the poolings Lava can build as layers (simulators/counting.py, simulators/estimate.py; docs/lava.md,
"Events: folded vs a pooling layer").
"""
from __future__ import annotations

from dataclasses import dataclass

from .ir import Graph, Node

SUMMING = {"avg_pool2d", "adaptive_avg_pool2d", "mean", "sum"}   # linear in the levels: foldable into weights
LAYOUT = {"flatten", "reshape", "squeeze"}                       # between such a pooling and a linear layer


@dataclass(frozen=True)
class SumKernel:
    """A pooling as a depthwise convolution of ones, (h, w) each, then a division by ``divisor``."""
    kernel: list
    stride: list
    padding: list
    divisor: int


def _pair(v) -> list:
    v = list(v)
    return v * 2 if len(v) == 1 else v


def window(graph: Graph, n: Node) -> tuple[int, int] | None:
    """(kh, kw) when average pooling node n averages disjoint kh×kw windows tiling its input exactly."""
    a = n.attrs
    if len(n.shape) != 4 or len(graph[n.inputs[0]].shape) != 4:
        return None
    h, w = graph[n.inputs[0]].shape[2:]
    if n.op == "avg_pool2d":
        k = _pair(a["kernel_size"])
        st = _pair(a["stride"] or k)
        if k != st or any(a.get("padding", [0])) or a.get("divisor_override") or h % k[0] or w % k[1]:
            return None
        return k[0], k[1]
    if n.op == "adaptive_avg_pool2d":
        oh, ow = n.shape[2:]
        return (h // oh, w // ow) if h % oh == 0 and w % ow == 0 else None
    if n.op == "mean" and a.get("keepdim") and sorted(d % 4 for d in a["dims"]) == [2, 3]:
        return h, w
    return None


def sum_kernel(graph: Graph, n: Node) -> SumKernel | None:
    """Node n as a window sum divided by one count, which a pooling layer computes; None otherwise
    (count_include_pad off with padding, a divisor override, ceil mode, uneven adaptive windows, a plain sum)."""
    a, shape = n.attrs, graph[n.inputs[0]].shape
    if len(shape) != 4:
        return None
    if n.op == "avg_pool2d":
        k, st, pad = _pair(a["kernel_size"]), _pair(a["stride"] or a["kernel_size"]), _pair(a.get("padding", [0]))
        if a.get("ceil_mode") or a.get("divisor_override") or (any(pad) and not a.get("count_include_pad", True)):
            return None
        return SumKernel(k, st, pad, k[0] * k[1])
    if n.op == "mean" and sorted(d % 4 for d in a["dims"]) == [2, 3]:
        h, w = shape[2:]
        return SumKernel([h, w], [h, w], [0, 0], h * w)
    win = window(graph, n) if n.op == "adaptive_avg_pool2d" else None
    return None if win is None else SumKernel(list(win), list(win), [0, 0], win[0] * win[1])


def spike_poolings(graph: Graph, users: dict[str, list[Node]] | None = None) -> dict[str, list[str]]:
    """Summing poolings of a site's spikes whose every reader is a weight layer they fold into (a linear layer
    through flattens/reshapes keeping the batch axis first; a convolution reading a pooling of disjoint windows),
    each with the layout nodes between it and those layers."""
    users = graph.users() if users is None else users

    def reaches_weights(pool: Node, u: Node, chain: list) -> bool:
        if u.op == "linear" and len(u.shape) == 2 and u.bdim == 0:
            return True
        if u.op == "conv2d" and u.inputs[0] == pool.name and window(graph, pool) is not None \
                and list(u.attrs.get("dilation", [1, 1])) == [1, 1]:
            return True
        if u.op in LAYOUT and u.bdim == 0 and users[u.name]:
            chain.append(u.name)
            return all(reaches_weights(pool, v, chain) for v in users[u.name])
        return False
    out = {}
    for n in graph:
        if n.op not in SUMMING or n.bdim != 0 or not n.inputs or graph[n.inputs[0]].op != "sfn":
            continue
        chain: list = []
        if users[n.name] and all(reaches_weights(n, u, chain) for u in users[n.name]):
            out[n.name] = chain
    return out


def pooling_layers(graph: Graph, users: dict[str, list[Node]] | None = None) -> dict[str, SumKernel]:
    """The spike poolings that a graded target can run as pooling layers, with their window sums."""
    out = {}
    for name in spike_poolings(graph, users):
        kernel = sum_kernel(graph, graph[name])
        if kernel is not None:
            out[name] = kernel
    return out
