"""Bias correction (issue 16, a training-free knob): the mean error a site's spikes make, folded into the next
weight layers' biases.

A site replaces its ANN activation a(x) (x, or relu(x) where it absorbed a ReLU) by its level q(x); where the error
q(x) − a(x) has a non-zero mean (clipping at θ, the sformer's uneven levels, repeated values sitting on one side
of a boundary), every weight layer reading it inherits a systematic shift W·E[q − a]. That shift is measured on
calibration images in the SNN itself (each site's input already carries the sites before it), carried through the
linear operators between the site and the weight layer (layout ops, average pooling, padding, scalings) as a map
of one sample, and subtracted from the layer's bias: per output channel, the mean over positions of the layer
applied to the error map, the best constant correction in the least-squares sense.

Sites whose spikes reach anything else (a product, a residual sum, max pooling) keep their error on that path; the
weight layers they reach directly or through linear operators are still corrected.
"""
from __future__ import annotations

import torch

from .ir import Graph, Node
from .ops import apply
from .simulators.interpreter import Event, Observer, run

# operators that are linear in the spikes and keep the batch axis first: the error map passes through them
_LINEAR = {"reshape", "permute", "transpose", "flatten", "unsqueeze", "squeeze", "roll", "avg_pool2d",
           "adaptive_avg_pool2d", "mean", "sum", "pad", "select", "slice", "expand"}


class _Errors(Observer):
    """Σ over the batch of q(x) − a(x) at every site (float64, one sample's shape), and the sample count."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.samples = 0

    def __call__(self, event: Event) -> None:
        node = event.node
        if node.op != "sfn" or event.out is None:
            return
        x = event.args[0]
        ann = torch.relu(x) if node.attrs.get("absorbs") == "relu" else x
        err = (event.out.to(torch.float64) - ann.to(torch.float64)).sum(0).cpu()
        held = self.sums.get(node.name)
        self.sums[node.name] = err if held is None else held + err


def measure(graph: Graph, batches) -> dict[str, torch.Tensor]:
    """Mean error map of every site (one sample's shape) over the batches, in the SNN as it stands."""
    errors = _Errors()
    for xb in batches:
        run(graph, xb, spiking=True, hook=errors)
        errors.samples += xb.shape[0]
    return {name: s / max(errors.samples, 1) for name, s in errors.sums.items()}


def _reached(graph: Graph, site: Node) -> list[tuple[Node, list[Node]]]:
    """The weight layers that read the site's spikes as their data input through linear operators, each with the
    operators on the way."""
    users = graph.users()
    found: list[tuple[Node, list[Node]]] = []
    todo: list[tuple[Node, list[Node], str]] = [(u, [], site.name) for u in users[site.name]]
    while todo:
        node, path, came = todo.pop()
        if node.inputs[0] != came:
            continue
        if node.op in ("linear", "conv2d"):
            found.append((node, path))
        elif len(node.inputs) == 1 and (node.op in _LINEAR or node.op in ("mul", "div")):     # mul/div: by a scalar
            todo += [(u, path + [node], node.name) for u in users[node.name]]
    return found


def corrections(graph: Graph, errors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per weight layer, the amount to subtract from its bias (float32 [out]); summed over the sites it reads."""
    out: dict[str, torch.Tensor] = {}
    for site in graph.sites:
        e = errors.get(site.name)
        if e is None:
            continue
        for layer, path in _reached(graph, site):
            t = e.to(torch.float32).unsqueeze(0)
            for op in path:
                t = apply(op, [t], graph, 1)
            p = layer.params
            if layer.op == "linear":
                y = torch.nn.functional.linear(t, p["weight"])
                shift = y.reshape(-1, y.shape[-1]).mean(0)
            else:
                a = layer.attrs
                y = torch.nn.functional.conv2d(t, p["weight"], None, a["stride"], a["padding"], a["dilation"],
                                               a["groups"])
                shift = y.mean((0, 2, 3))
            out[layer.name] = out.get(layer.name, 0) + shift.to(torch.float32)
    return out


def apply_corrections(graph: Graph, shifts: dict[str, torch.Tensor]) -> None:
    """Subtract each shift from its layer's bias (a layer without one gets one)."""
    for name, shift in shifts.items():
        p = graph[name].params
        bias = p.get("bias")
        p["bias"] = (-shift if bias is None else bias - shift.to(bias.dtype)).contiguous()


def sequential(graph: Graph, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per weight layer, its mean SNN − ANN output per channel on the batch ``x``, measured in graph order with
    every earlier layer already corrected: the whole shift each layer's input carries (its sites' own errors and
    whatever the sites before them propagate through products, sums and nonlinearities), one pass of both nets."""
    from .simulators.interpreter import AnnInterpreter, SnnInterpreter, release_plan
    nets = (AnnInterpreter(graph), SnnInterpreter(graph))
    envs: tuple[dict, dict] = ({}, {})
    for net in nets:
        net.x, net.batch = x, x.shape[0]
    free = release_plan(graph)
    shifts: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for node in graph.nodes:
            for net, env in zip(nets, envs, strict=True):
                args = [env[i] for i in node.inputs]
                env[node.name] = net.run_node(node, args, Event(node, args))
            if node.op in ("linear", "conv2d"):
                d = (envs[1][node.name] - envs[0][node.name]).to(torch.float64)
                axis = 1 if node.op == "conv2d" else d.dim() - 1
                shift = d.transpose(0, axis).reshape(d.shape[axis], -1).mean(1).to(torch.float32)
                shape = [1] * d.dim()
                shape[axis] = -1
                envs[1][node.name] = envs[1][node.name] - shift.view(shape)
                shifts[node.name] = shift
            for name in free.get(node.name, ()):
                for env in envs:
                    del env[name]
    return shifts
