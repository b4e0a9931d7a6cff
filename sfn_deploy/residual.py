"""Residual sums whose neurons can integrate both operands' synapses on a graded chip's cores, instead of a host
adding the two values and sending the neurons their input.

One graph fact for the places that need it: the Lava lowering builds them (exporters/lava/plan.py,
``residual_sums``), and the op counter and the core mapping price them on graded targets
(simulators/counting.py, targets/mapping.py; docs/lava.md, "Residual sums run on cores").
"""
from __future__ import annotations

from dataclasses import dataclass

from .ir import Graph, Node
from .pooling import spike_poolings


@dataclass(frozen=True)
class Shortcut:
    """An operand that is spikes, reaching the sum through a 1×1 synapse that reads ``spikes`` (a site, or a max
    pooling of one, whose levels a host sends): the identity (``channels`` None) or a parameter-free shortcut
    (ResNet "option A": strided slices over H and W, then ``channels`` zero channels padded on before and after),
    whose slices and padding (``chain``) the synapse replaces."""
    spikes: str
    stride: tuple[int, int] = (1, 1)
    channels: tuple[int, int] | None = None
    chain: tuple[str, ...] = ()


def shortcut(graph: Graph, users: dict[str, list[Node]], value: str) -> Shortcut | None:
    """``value`` as a site's spikes, directly, through a parameter-free shortcut each of whose nodes only the
    next reads, or max-pooled (timm's and torchvision's ResNets after the stem); None otherwise."""
    n, stride, chans, chain = graph[value], [1, 1], None, []
    if n.op == "max_pool2d" and graph[n.inputs[0]].op == "sfn" and n.bdim == 0:
        return Shortcut(n.name)
    while n.op in ("slice", "pad"):
        a, src = n.attrs, graph[n.inputs[0]]
        if len(n.shape) != 4 or len(users[n.name]) != 1 or len(src.shape) != 4:
            return None
        if n.op == "pad":
            p = list(a["pad"]) + [0] * (8 - len(a["pad"]))
            if a.get("mode", "constant") != "constant" or float(a.get("value", 0.0)) != 0.0 or any(p[:4]) \
                    or any(p[6:]) or min(p) < 0 or chans is not None:
                return None
            chans = (p[4], p[5])
        else:
            d = a["dim"] % 4
            if d not in (2, 3) or (a.get("start") or 0) != 0 or stride[d - 2] != 1 \
                    or (a.get("end") is not None and a["end"] < src.shape[d]):
                return None
            stride[d - 2] = int(a.get("step") or 1)
        chain.append(n.name)
        n = src
    if n.op != "sfn" or n.bdim != 0:
        return None
    return Shortcut(n.name, (stride[0], stride[1]), chans if chain else None, tuple(chain))


def _reads_spikes(graph: Graph, layer: Node, folded: set[str]) -> bool:
    """A weight layer reading a site's own spikes: directly, through an average pooling folded into it, or
    max-pooled (levels a host sends)."""
    x = graph[layer.inputs[0]]
    return x.op == "sfn" or x.name in folded or (x.op == "max_pool2d" and graph[x.inputs[0]].op == "sfn")


def core_sums(graph: Graph, pool_layers=frozenset(), users: dict[str, list[Node]] | None = None
              ) -> dict[str, dict[int, Shortcut]]:
    """The residual sums on cores, each with its operands that are a site's spikes (by operand index): an ``add``
    of two conv maps (the batch axis first) whose every reader is an SFN site, each operand a convolution read by
    nothing else that reads a site's spikes (directly, max-pooled, or through an average pooling folded into it,
    i.e. not one of ``pool_layers``), or a site's spikes (:func:`shortcut`)."""
    users = graph.users() if users is None else users
    folded = set(spike_poolings(graph, users)) - set(pool_layers)
    sums: dict[str, dict[int, Shortcut]] = {}
    for n in graph:
        if n.op != "add" or len(n.inputs) != 2 or n.attrs or n.bdim != 0 or len(n.shape) != 4 \
                or not users[n.name] or any(u.op != "sfn" for u in users[n.name]):
            continue
        spikes = {}
        for k, i in enumerate(n.inputs):
            v = graph[i]
            if list(v.shape) != list(n.shape) or v.bdim != 0:
                break
            cut = shortcut(graph, users, i)
            if cut is not None:
                spikes[k] = cut
            elif v.op != "conv2d" or [u.name for u in users[i]] != [n.name] or not _reads_spikes(graph, v, folded):
                break
        else:
            sums[n.name] = spikes
    return sums
