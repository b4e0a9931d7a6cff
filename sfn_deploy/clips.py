"""Clips to [0, c] (ReLU6) that a graded chip runs inside the neurons they feed: the neurons read the weight
layer's sum and keep only their thresholds up to c, which fires the same levels as firing on the clipped value
(a level that needs more than c never fires, and a positive-only site fires none below 0).

One graph fact for the places that need it: the Lava lowering builds them (exporters/lava/plan.py) and the core
mapping prices them as neurons, not host work, on graded targets (targets/mapping.py; docs/lava.md).
"""
from __future__ import annotations

from .ir import Graph, Node


def neuron_clips(graph: Graph, users: dict[str, list[Node]] | None = None) -> dict[str, float]:
    """Each ``hardtanh`` to [0, c] of a weight layer's output whose every reader is a positive-only site: c."""
    users = graph.users() if users is None else users
    out = {}
    for n in graph:
        readers = users[n.name]
        if n.op == "hardtanh" and float(n.attrs["min_val"]) == 0.0 and float(n.attrs["max_val"]) > 0 \
                and graph[n.inputs[0]].op in ("linear", "conv2d") and readers \
                and all(u.op == "sfn" and not u.params["bounds_neg"].numel() for u in readers):
            out[n.name] = float(n.attrs["max_val"])
    return out
