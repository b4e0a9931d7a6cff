"""The plan of a multi-timestep execution of a converted graph (the baselines of docs/methods.md).

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

:class:`sfn_deploy.simulators.interpreter.TemporalInterpreter` executes the plan. Observers
(calibration, the op counter) get an event per node per step with ``t`` and ``T`` (static nodes
once, flagged ``static``), and for a neuron its ``position`` as for an ``sfn`` site, so the counts
sum over the T steps.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from sfn_deploy.ir import STATEFUL_OPS, Graph, Node

# ops whose output is linear in their time-varying inputs (when at most one input varies, for products)
_LINEAR = {"conv2d", "linear", "add", "sub", "avg_pool2d", "adaptive_avg_pool2d", "mean", "batch_norm",
           "reshape", "permute", "transpose", "flatten", "unsqueeze", "squeeze", "select", "slice", "cat",
           "expand", "pad", "roll", "sum"}
_BILINEAR = {"matmul", "mul"}
_SPIKE_PATH = {"reshape", "permute", "transpose", "flatten", "unsqueeze", "squeeze", "select", "slice",
               "expand", "max_pool2d", "pad", "roll"}


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
    """Record :func:`temporal_plan` in ``attrs["temporal"]`` of every node (for inspection; the interpreter
    recomputes it)."""
    for name, how in temporal_plan(graph).items():
        graph[name].attrs["temporal"] = how
    return graph


def gate(node: Node, x: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """Pass, per window, the current spike of the element with the largest running spike sum."""
    a = node.attrs
    _, idx = F.max_pool2d(count, a["kernel_size"], a["stride"], a["padding"], a["dilation"], a["ceil_mode"],
                          return_indices=True)
    flat = x.flatten(-2)
    return flat.gather(-1, idx.flatten(-2)).view(idx.shape)
