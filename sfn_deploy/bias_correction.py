"""Bias correction (issue 16, a training-free knob): each weight layer's mean SNN − ANN shift folded into the SNN's
bias.

A site replaces its ANN activation by a level; where the errors do not average out (clipping at θ, the sformer's
uneven levels, a repeated value on one side of a boundary), every layer after it sees its input shifted, and the
shift grows through the network. Measured on calibration images, in graph order, with both nets stepped together:
at each weight layer the per-channel mean of SNN − ANN output (over images and positions) is subtracted from the
SNN's bias before the next layer is measured, so each layer corrects what the ones before it left, whatever its
path (products, residual sums, nonlinearities). One pass of the ANN and the SNN over one batch.

The source model's bias is kept as ``bias_ann`` (the ANN reference, ``AnnInterpreter`` and the ONNX ANN export use
it); ``bias`` is the SNN's, which every SNN backend and exporter reads as before. Measured (docs/concepts.md, "Bias
correction"): top-1 agreement with the ANN rose in 25 of 30 held-out and bundled model/λ pairs, by up to 25 points,
and fell in 5, by at most 0.75; ``auto`` (the default) without a budget therefore keeps the correction only where
the validation images' agreement does not fall. With ``--max-drop`` it is ``search`` (``ConvertConfig.correction``):
every λ trial is scored with its own correction (:func:`scaled`), so the search sees what the correction buys.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch

from . import devices, fidelity
from .data import Dataset
from .evaluation import measure, predict
from .ir import Graph, Node
from .passes import set_scale
from .simulators.counting import OpCounter
from .simulators.interpreter import AnnInterpreter, Event, Interpreter, SnnInterpreter, release_plan

IMAGES = 256            # calibration images the shifts are measured on (one batch: at most --batch-size)


def images(data: Dataset, batch_size: int, seed: int) -> torch.Tensor:
    """The calibration images the shifts are measured on: one seeded batch of ``data``."""
    return data.sample(min(IMAGES, batch_size), seed + 1).in_memory().x


def scaled(graph: Graph, lam: float | dict[str, float], x: torch.Tensor | None) -> None:
    """A trial's state: the source model's biases, λ set, and with ``x`` (``--bias-correction search``) the
    correction measured at that λ on ``x`` applied, so that the trial is scored as convert delivers its point."""
    revert(graph)
    set_scale(graph, lam)
    if x is not None:
        apply(graph, shifts(graph, x))


@dataclass
class Layer:
    """A weight layer as :func:`step_through` reaches it: its inputs and outputs in both nets."""
    node: Node
    snn_inputs: list[torch.Tensor]
    ann_inputs: list[torch.Tensor]
    snn: torch.Tensor
    ann: torch.Tensor
    rerun: Callable[[], torch.Tensor]     # the node again on snn_inputs (after the hook changed its parameters)


def step_through(graph: Graph, x: torch.Tensor, at_layer: Callable[[Layer], torch.Tensor | None]) -> None:
    """Run the ANN and the SNN side by side over the batch ``x``, node by node in graph order; at each weight layer
    (linear, conv2d) ``at_layer`` sees both and may return a replacement for the SNN's output, so that every later
    layer is measured with the ones before it corrected. On a GPU it runs on the device's mirror of the graph (the
    hook gets the mirror's nodes); each value is freed after its last reader."""
    device = devices.current()
    graph, x = devices.mirror(graph, device), x.to(device)
    nets: tuple[Interpreter, Interpreter] = (AnnInterpreter(graph), SnnInterpreter(graph))
    envs: tuple[dict, dict] = ({}, {})
    for net in nets:
        net.x, net.batch = x, x.shape[0]
    free = release_plan(graph)
    with torch.no_grad():
        for node in graph.nodes:
            for step, env in zip(nets, envs, strict=True):
                args = [env[i] for i in node.inputs]
                env[node.name] = step.run_node(node, args, Event(node, args))
            if node.op in ("linear", "conv2d"):
                snn_in = [envs[1][i] for i in node.inputs]
                layer = Layer(node, snn_in, [envs[0][i] for i in node.inputs], envs[1][node.name], envs[0][node.name],
                              partial(nets[1].run_node, node, snn_in, Event(node, snn_in)))
                new = at_layer(layer)
                if new is not None:
                    envs[1][node.name] = new
            for name in free.get(node.name, ()):
                for env in envs:
                    del env[name]


def shifts(graph: Graph, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per weight layer (linear, conv2d), its mean SNN − ANN output per channel on the batch ``x`` (float32
    [out]), each measured with the layers before it already corrected."""
    out: dict[str, torch.Tensor] = {}

    def subtract_mean(layer: Layer) -> torch.Tensor:
        d = (layer.snn - layer.ann).to(torch.float64)
        axis = 1 if layer.node.op == "conv2d" else d.dim() - 1
        shift = d.transpose(0, axis).reshape(d.shape[axis], -1).mean(1).to(torch.float32)
        shape = [1] * d.dim()
        shape[axis] = -1
        out[layer.node.name] = shift.cpu()
        return layer.snn - shift.view(shape)
    step_through(graph, x, subtract_mean)
    return out


def apply(graph: Graph, found: dict[str, torch.Tensor]) -> None:
    """Subtract each shift from its layer's SNN bias; the source bias stays as ``bias_ann`` (zeros for a layer
    that had none)."""
    for name, shift in found.items():
        if not bool(shift.any()):          # (the layers before the first site: the same input in both nets)
            continue
        p = graph[name].params
        w = p["weight"]
        source = p.get("bias_ann", p.get("bias"))
        if source is None:
            source = torch.zeros(w.shape[0], dtype=w.dtype)
        p["bias_ann"] = source
        p["bias"] = (p.get("bias", source) - shift.to(source.dtype)).contiguous()


def revert(graph: Graph) -> None:
    """The SNN's biases back to the source model's (``bias_ann`` removed)."""
    for node in graph.nodes:
        if "bias_ann" in node.params:
            node.params["bias"] = node.params.pop("bias_ann")


@dataclass
class Checked:
    """The auto check's validation passes at the state it kept: the SNN's and the ANN's top-1 classes (or outputs,
    with output fidelity) and the SNN pass's op counts — what ``convert`` reports, without running them again."""
    snn: torch.Tensor
    ann: torch.Tensor
    counter: OpCounter


def _agreement(snn: torch.Tensor, ann: torch.Tensor, kind: str = "accuracy") -> float:
    """Top-1 agreement (%), or with output fidelity 100 × the mean cosine similarity."""
    return round(fidelity.scores(kind, snn, ann, None)[0], 4)


def keep(agreement_before: float, agreement_after: float, drops: list[float], max_drop: float | None) -> bool:
    """``auto``'s rule: agreement with the ANN does not fall, and the drop (before, after) stays within
    ``max_drop`` or does not grow. Agreement is the tighter statistic (docs/concepts.md "Validation images"), yet
    on weak models it can rise while the drop grows: convert's budget, or its goal, is the drop."""
    if agreement_after < agreement_before:
        return False
    return max_drop is None or drops[1] <= max(max_drop, drops[0])


def correct(graph: Graph, x: torch.Tensor, mode: str, val: Dataset | None = None, batch_size: int = 256,
            max_drop: float | None = None, kind: str = "accuracy") -> tuple[dict, Checked | None]:
    """Measure the shifts on ``x`` and apply them. ``mode`` "on" (or "search": the search scored its trials so):
    keep them; "auto": keep them only if the SNN's
    agreement with the ANN on ``val`` (streamed; top-1, or with output fidelity the cosine similarity) does not
    fall and, with ``max_drop`` (convert passes its budget, else ``config.GOAL``), its drop there (against the
    labels when there are any) stays within it or does not grow (:func:`keep`). Returns the record kept in the
    converted model's metrics, and with "auto" the check's passes at the state kept (:class:`Checked`; None
    otherwise)."""
    record: dict = {"mode": mode, "images": int(x.shape[0])}
    if kind == "output":
        record["measure"] = "cosine"            # the val_agreement figures are 100 × mean cosine similarity
    ann = before = checked = None
    if val is not None and mode == "auto":
        ann = predict(graph, val, batch_size, spiking=False, top1=kind == "accuracy")
        before, counted = measure(graph, val, batch_size, top1=kind == "accuracy")
        checked = Checked(before, ann, counted)
        record["val_images"] = len(val)
        record["val_agreement_before"] = _agreement(before, ann, kind)
    found = shifts(graph, x)
    apply(graph, found)
    record["layers"] = sum(1 for n in graph.nodes if "bias_ann" in n.params)
    record["max_abs_shift"] = max((float(s.abs().max()) for s in found.values()), default=0.0)
    if val is not None and ann is not None and before is not None and record["layers"]:
        after, counted = measure(graph, val, batch_size, top1=kind == "accuracy")
        record["val_agreement_after"] = _agreement(after, ann, kind)
        labels = val.y if val.labeled else None
        drops = [a - s for s, a in (fidelity.scores(kind, p, ann, labels) for p in (before, after))]
        record["val_drop_before"], record["val_drop_after"] = (round(d, 4) for d in drops)
        if not keep(record["val_agreement_before"], record["val_agreement_after"], drops, max_drop):
            revert(graph)
        else:
            checked = Checked(after, ann, counted)
    record["applied"] = any("bias_ann" in n.params for n in graph.nodes)
    return record, checked
