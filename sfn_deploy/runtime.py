"""Reference interpreter: runs a converted :class:`~sfn_deploy.ir.Graph` in PyTorch.

The same graph runs as the ANN (``spiking=False``: every SFN is the identity, so
the result equals the source model) or as the single-timestep SNN. Observers see
every node's inputs and output; calibration and op counting are observers, so
there is exactly one execution path for all of them.
"""
from __future__ import annotations

from typing import Callable

import torch

from .ir import NEURON_OPS, Graph, Node
from .ops import apply as apply_op

Hook = Callable[[Node, list, torch.Tensor, dict], None]


def spike_index(node: Node, x: torch.Tensor) -> torch.Tensor:
    """Signed number of firing boundaries crossed (k⁺ − k⁻): the level is table[|k|] with k's sign.

    Both branches cannot fire at once (all boundaries are positive), so the difference is exact.
    """
    p = node.params
    x = x.contiguous()
    k = torch.bucketize(x, p["bounds_pos"], right=True)
    if p["bounds_neg"].numel():
        k = k - torch.bucketize(-x, p["bounds_neg"], right=True)
    return k


def signed_table(node: Node) -> torch.Tensor:
    """Level of each signed index −N..N, at position index + N."""
    t = node.params["table"]
    return torch.cat([-t.flip(0)[:-1], t])


def spike_levels(node: Node, x: torch.Tensor) -> torch.Tensor:
    """Signed integer spike level of an SFN node for input x (see ir.py for the rule)."""
    n = node.params["table"].numel() - 1
    return signed_table(node)[spike_index(node, x) + n]


def level_values(node: Node, level: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """o = level · λθ⁺ for level ≥ 0 and level · λθ⁻ below."""
    steps = node.params["steps"].to(dtype)
    lv = level.to(dtype)
    if node.params["bounds_neg"].numel():
        return torch.where(level >= 0, lv * steps[0], lv * steps[1])
    return lv * steps[0]


def fire(node: Node, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(output value, position) of an SFN: position = signed index + N (int32, ≥ 0), from the
    constant-time table of :mod:`sfn_deploy.firegrid` (or bucketize), then one lookup.

    The lookup table holds level_values of every level, computed with the same float
    operations, so the output is bit-identical to level_values(spike_levels(x)).
    """
    out, pos, _ = _fire(node, x)
    return out, pos


def _fire(node: Node, x: torch.Tensor, hist: bool = False, position: bool = True):
    """fire(), plus the histogram of positions (int64, 2N+1 bins) when asked (else None); the position is
    None when not asked for."""
    from .firegrid import grid_for
    n = node.params["table"].numel() - 1
    grid = grid_for(node) if x.dtype == torch.float32 else None
    values = _level_table(node, x.dtype)
    if grid is not None:
        return grid.fire(x, values, hist, position)
    pos = (spike_index(node, x) + n).to(torch.int32)
    out = torch.index_select(values, 0, pos.reshape(-1)).view(pos.shape)
    return out, pos if position else None, torch.bincount(pos.reshape(-1), minlength=2 * n + 1) if hist else None


def _level_table(node: Node, dtype) -> torch.Tensor:
    """level_values of every signed index (at position index + N), cached per node, dtype and the tensors
    it is computed from (``passes.configure`` replaces them)."""
    p = node.params
    key = (p["table"], p["steps"], p["bounds_neg"], dtype)
    cached = node.__dict__.get("_level_table")
    if cached is None or any(a is not b for a, b in zip(cached[0], key)):
        cached = (key, level_values(node, signed_table(node), dtype).contiguous())
        node.__dict__["_level_table"] = cached
    return cached[1]


@torch.no_grad()
def run(graph: Graph, x: torch.Tensor, *, spiking: bool = True, hook: Hook | None = None) -> torch.Tensor:
    """Execute the graph on a batch ``x`` (batch axis first) and return the output tensor.

    A graph with stateful neurons (a multi-timestep baseline) runs its T steps as the SNN
    (:func:`sfn_deploy.temporal.run_steps`: the mean output over the steps).
    """
    if spiking and graph.stateful:
        from .temporal import run_steps
        return run_steps(graph, x, hook)
    env: dict[str, torch.Tensor] = {}
    batch = x.shape[0]
    free = _release_plan(graph)
    # A hook may ask for each site's histogram of positions (extra["hist"]) and name the sites whose
    # positions it does not read (no extra["position"] there); the default hook gets positions only.
    wants_hist = bool(getattr(hook, "wants_hist", False))
    skip_positions = getattr(hook, "skip_positions", None) or ()
    for node in graph.nodes:
        extra: dict = {}
        args = [env[i] for i in node.inputs]
        if node.op == "input":
            out = x
        elif node.op == "constant":
            out = node.params["value"]
        elif node.op == "mbe_neuron" or (spiking and "mbe_fn" in node.attrs):
            if spiking:         # --method mbe: the spiking MBE form (sfn_deploy/mbe.py)
                from .mbe import apply
                out, more = apply(node, args)
                extra.update(more)
            else:
                out = torch.relu(args[0]) if node.attrs.get("absorbs") == "relu" else args[0]
        elif node.op in NEURON_OPS:
            if spiking:
                position = node.name not in skip_positions
                out, pos, hist = _fire(node, args[0], wants_hist, position)
                if position:
                    extra["position"] = pos
                if hist is not None:
                    extra["hist"] = hist
            else:       # the ANN: identity, or the ReLU the neuron absorbed
                out = torch.relu(args[0]) if node.attrs.get("absorbs") == "relu" else args[0]
        else:
            out = apply_op(node, args, graph, batch)
        env[node.name] = out
        if hook is not None:
            hook(node, args, out, extra)
        for name in free.get(node.name, ()):     # bounded memory: drop values nobody reads any more
            del env[name]
    return env[graph.output]


def run_with_levels(graph: Graph, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The SNN's output and the signed integer spike level of every SFN site, for checking backends."""
    levels: dict[str, torch.Tensor] = {}

    def keep(node, args, out, extra):
        if "position" in extra:
            pos = extra["position"]
            levels[node.name] = torch.index_select(signed_table(node), 0, pos.reshape(-1)).view(pos.shape)
    return run(graph, x, hook=keep), levels


def _release_plan(graph: Graph) -> dict[str, list[str]]:
    """For each node, the values whose last reader it is (the output is kept)."""
    last: dict[str, str] = {}
    for n in graph.nodes:
        for i in n.inputs:
            last[i] = n.name
    plan: dict[str, list[str]] = {}
    for value, reader in last.items():
        if value != graph.output:
            plan.setdefault(reader, []).append(value)
    return plan
