"""Multi-timestep execution of a converted graph (the baselines of docs/methods.md).

A graph with stateful neurons (``if_neuron``) runs ``T = graph.timesteps`` synchronous
steps per inference: at every step every node is evaluated in order on the same input
image (direct input, no Poisson coding), and the decoded output is the **mean** of the
output node over the T steps (its argmax is the argmax of the summed logits).

How each node behaves over time is one of (:func:`temporal_plan`; ``mark_temporal``
records it in ``attrs["temporal"]`` so ``inspect`` shows it):

- ``static``: every input is constant over time (the network input, stored constants and
  what is computed from them only, e.g. the first convolution on the image). Computed once
  per inference; its cost is counted once (the constant input current of the first layer).
- ``state``: a stateful neuron (``if_neuron``): m = v + x(t); fire by the site's level
  table; v = m − o (soft reset); v(0) = v0·step⁺.
- ``step``: an operation linear in its time-varying inputs (weight layers, residual
  additions, average pooling, layout, products with one constant operand): applied to each
  step's values; the mean of its outputs is the operation of the mean inputs.
- ``ecm``: a non-linear operation on time-varying values (LayerNorm, softmax, GELU, ReLU,
  max pooling of analog values, products of two time-varying activations): ECMT's
  Expectation Compensation Module, O(t) = t·f(S(t)/t) − (t−1)·f(S(t−1)/(t−1)) with S the
  running sum of each input, so that Σ_{i≤t} O(i) = t·f(running means). For a product of two
  activations this is exactly ECMT's matmul compensation (cumulative output S_A·S_B/t).
- ``gate``: max pooling of spikes: per window the element with the largest running spike sum
  passes its current spike (Rueckauer et al. 2017's spiking max-pool gate), so the pooled
  rate approaches the maximum rate instead of the OR of the window.

Observers (calibration, the op counter) are called once per node per step with
``extra = {"t": t, "T": T}`` (static nodes once, with ``{"static": True}``), and for a
neuron ``extra["position"]`` as for an ``sfn`` site, so the counts sum over the T steps.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .ir import STATEFUL_OPS, Graph, Node

# ops whose output is linear in their time-varying inputs (when at most one input varies, for products)
_LINEAR = {"conv2d", "linear", "add", "sub", "avg_pool2d", "adaptive_avg_pool2d", "mean", "batch_norm",
           "reshape", "permute", "transpose", "flatten", "unsqueeze", "squeeze", "select", "slice", "cat",
           "expand"}
_BILINEAR = {"matmul", "mul"}
_SPIKE_PATH = {"reshape", "permute", "transpose", "flatten", "unsqueeze", "squeeze", "select", "slice",
               "expand", "max_pool2d"}


def temporal_plan(graph: Graph) -> dict[str, str]:
    """How each node behaves over the T steps: static, state, step, ecm or gate (see the module docstring)."""
    plan: dict[str, str] = {}
    spikes: set[str] = set()          # values that are spikes of a stateful neuron (through layout/pooling)
    for n in graph.nodes:
        if n.op in ("input", "constant"):
            plan[n.name] = "static"
            continue
        if n.op in STATEFUL_OPS:
            plan[n.name] = "state"
            spikes.add(n.name)
            continue
        varying = [i for i in n.inputs if plan[i] != "static"]
        if not varying:
            plan[n.name] = "static"
        elif n.op == "max_pool2d" and n.inputs[0] in spikes:
            plan[n.name] = "gate"
        elif n.op in _LINEAR or (n.op in _BILINEAR and len(varying) == 1) \
                or (n.op == "div" and n.inputs[0] in varying and len(varying) == 1) or n.op == "sfn":
            plan[n.name] = "step"
        else:
            plan[n.name] = "ecm"
        if n.op in _SPIKE_PATH and n.inputs and n.inputs[0] in spikes:
            spikes.add(n.name)
    return plan


def mark_temporal(graph: Graph) -> Graph:
    """Record :func:`temporal_plan` in ``attrs["temporal"]`` of every node (for inspection; the runtime
    recomputes it)."""
    for name, how in temporal_plan(graph).items():
        graph[name].attrs["temporal"] = how
    return graph


def _gate(node: Node, x: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """Pass, per window, the current spike of the element with the largest running spike sum."""
    a = node.attrs
    _, idx = F.max_pool2d(count, a["kernel_size"], a["stride"], a["padding"], a["dilation"], a["ceil_mode"],
                          return_indices=True)
    flat = x.flatten(-2)
    return flat.gather(-1, idx.flatten(-2)).view(idx.shape)


@torch.no_grad()
def run_steps(graph: Graph, x: torch.Tensor, hook=None, timesteps: int | None = None) -> torch.Tensor:
    """Run the SNN for T steps on a batch ``x``; the mean output over the steps."""
    from .runtime import _release_plan, fire

    T = int(timesteps or graph.timesteps)
    if T < 1:
        raise ValueError(f"timesteps must be ≥ 1, got {T}")
    plan = temporal_plan(graph)
    batch = x.shape[0]
    free = _release_plan(graph)
    static: dict[str, torch.Tensor] = {}
    state: dict[str, object] = {}
    total = None
    for t in range(T):
        env: dict[str, torch.Tensor] = dict(static)
        for node in graph.nodes:
            how = plan[node.name]
            if how == "static" and t > 0:
                continue
            args = [env[i] for i in node.inputs]
            extra: dict = {"static": True} if how == "static" else {"t": t, "T": T}
            if node.op == "input":
                out = x
            elif node.op == "constant":
                out = node.params["value"]
            elif how == "state":
                v = state.get(node.name)
                if v is None:
                    v0 = float(node.attrs.get("v0", 0.0)) * float(node.params["steps"][0])
                    v = torch.full_like(args[0], v0)
                m = v + args[0]
                out, extra["position"] = fire(node, m)
                state[node.name] = m - out
            elif how == "gate":
                count = state.get(node.name)
                count = args[0].clone() if count is None else count + args[0]
                state[node.name] = count
                out = _gate(node, args[0], count)
            elif how == "ecm":
                sums, prev = state.get(node.name, (None, None))
                sums = [a.clone() if plan[i] != "static" else a for i, a in zip(node.inputs, args)] if sums is None \
                    else [s + a if plan[i] != "static" else s for i, s, a in zip(node.inputs, sums, args)]
                means = [s / (t + 1) if plan[i] != "static" else s for i, s in zip(node.inputs, sums)]
                cum = (t + 1) * _apply(node, means, graph, batch)
                out = cum if prev is None else cum - prev
                state[node.name] = (sums, cum)
                extra["ecm"] = True
            else:
                out = _apply(node, args, graph, batch, extra)
            env[node.name] = out
            if how == "static":
                static[node.name] = out
            if hook is not None:
                hook(node, args, out, extra)
            for name in free.get(node.name, ()):
                if name in env and name not in static:
                    del env[name]
        y = env[graph.output]
        total = y.clone() if total is None else total + y
    return total / T


def _apply(node: Node, args: list, graph: Graph, batch: int, extra: dict | None = None) -> torch.Tensor:
    from .ops import apply
    from .runtime import fire
    if node.op == "sfn":
        out, pos = fire(node, args[0])
        if extra is not None:
            extra["position"] = pos
        return out
    if node.op in STATEFUL_OPS:      # ECM never wraps a neuron; kept for completeness
        raise ValueError(f"node {node.name}: a stateful neuron cannot be applied statelessly")
    return apply(node, args, graph, batch)
