"""Evaluating a network, apart from converting it: accuracy, agreement with the ANN, op counts and the
paper's energy ratio, on the reference interpreter or on any backend of :mod:`sfn_deploy.backends`.

The λ search, ``simulate``, ``report`` and the CLI read this module; it reads no conversion code, so
imports flow one way (capture → passes → calibrate → search → backends/simulators → reports → CLI).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from . import backends
from .data import Dataset
from .errors import UserError
from .ir import Graph
from .model_file import ConvertedModel
from .progress import progress
from .results import Result, optional
from .simulators.counting import OpCounter
from .simulators.interpreter import run
from .targets import load_target


@dataclass
class Evaluation(Result):
    """Accuracy (%) of the SNN and its ANN on a backend, and the reference op counts per inference."""
    backend: str
    samples: int
    accuracy: float                     # SNN top-1, %
    ann_accuracy: float                 # source ANN top-1, %
    agreement: float                    # SNN/ANN top-1 agreement, %
    energy_ratio: float                 # the paper's eq. 43: SNN energy / ANN energy at 45 nm CMOS prices
    ac_snn: float                       # accumulates per inference (spike convention)
    mac_snn: float                      # MACs per inference of layers with analog input
    mac_ann: float                      # MACs per inference of the source ANN
    host_ops: float                     # host operations per inference
    layers: list[dict[str, Any]] | None = optional()   # per-layer op counts per inference (None: left out)


def energy_constants(target: str = "cmos45") -> tuple[float, float]:
    """Energy of one accumulate and one multiply-accumulate (pJ), the paper's energy-ratio constants."""
    t = load_target(target)
    ac, mac = t.get("energy_pj", "ac"), t.get("energy_pj", "mac")
    if ac is None or mac is None:
        raise UserError(f"target {target}: energy_pj needs ac and mac for the energy ratio")
    return ac, mac


def check_data(graph: Graph, data: Dataset, where: str = "model") -> None:
    want = list(graph.input.shape[1:])
    got = list(data.x.shape[1:])
    if want != got:
        raise UserError(f"{data.name}: samples have shape {'×'.join(map(str, got))} but the {where} expects "
                        f"{'×'.join(map(str, want))}")
    out_shape = graph[graph.output].shape
    if len(out_shape) == 2 and len(data) and int(data.y.max()) >= out_shape[1]:
        raise UserError(f"{data.name}: labels go up to {int(data.y.max())} but the {where} has {out_shape[1]} "
                        "outputs")


def accuracy(pred: torch.Tensor, y: torch.Tensor) -> float:
    return 100.0 * float((pred == y).float().mean())


def measure(graph: Graph, data: Dataset, batch_size: int = 256, spiking: bool = True,
            quiet: bool = True, desc: str = "evaluating") -> tuple[torch.Tensor, OpCounter]:
    """Predictions (argmax) and op counts of one pass over the data."""
    counter = OpCounter(graph, spiking)
    preds = []
    for xb in progress(data.batches(batch_size), desc, quiet=quiet, total=-(-len(data) // batch_size)):
        counter.start_batch(xb.shape[0])
        preds.append(run(graph, xb, spiking=spiking, hook=counter).argmax(-1))
    return torch.cat(preds), counter


def backend_runner(converted: ConvertedModel, backend: str, ann: bool = False, threads: int | None = None,
                   lava: dict | None = None):
    """A function batch → logits running the SNN (or, with ann=True, its source ANN) on a backend.

    Building it is the backend's set-up (export, session creation), kept apart so it can be timed apart.
    A backend without an ANN form (NIR, Lava) runs the ANN on the reference. ``lava``: the Lava settings
    (precision, lowering, input_abs_max).
    """
    b = backends.get(backend)
    if ann and not b.runs_ann:
        b = backends.get(backends.REFERENCE)
    return b.runner(converted, ann=ann, threads=threads, options=lava)


def backend_logits(converted: ConvertedModel, data: Dataset, backend: str, batch_size: int = 256,
                   ann: bool = False, quiet: bool = True, threads: int | None = None,
                   lava: dict | None = None) -> torch.Tensor:
    """Logits of the SNN (or, with ann=True, its source ANN) computed by a backend."""
    runner = backend_runner(converted, backend, ann, threads, lava)
    if backends.get(backend).one_stream:    # set-up paid once, samples pipelined one per step
        batch_size = len(data)
    batches = progress(data.batches(batch_size), f"{backend}{' ANN' if ann else ''}", quiet=quiet,
                       total=-(-len(data) // batch_size))
    return torch.cat([runner(xb) for xb in batches])


def evaluate(converted: ConvertedModel, data: Dataset, backend: str = "torch", limit: int | None = None,
             batch_size: int = 256, quiet: bool = True, target: str = "cmos45",
             lava: dict | None = None) -> Evaluation:
    """Accuracy of SNN and ANN, their top-1 agreement and the op counts / energy ratio (paper convention).

    The op counts are always the reference interpreter's; on another backend the predictions are its own."""
    backends.get(backend)
    data = data.limit(limit)
    graph = converted.graph
    check_data(graph, data, "converted model")
    snn_pred, counter = measure(graph, data, batch_size, spiking=True, quiet=quiet, desc="SNN")
    if backend == backends.REFERENCE:
        ann_pred, _ = measure(graph, data, batch_size, spiking=False, quiet=quiet, desc="ANN")
    else:
        ann_pred = backend_logits(converted, data, backend, batch_size, ann=True, quiet=quiet).argmax(-1)
        snn_pred = backend_logits(converted, data, backend, batch_size, quiet=quiet, lava=lava).argmax(-1)
    counts = counter.result()
    e_ac, e_mac = energy_constants(target)
    return Evaluation(backend=backend, samples=len(data), accuracy=accuracy(snn_pred, data.y),
                      ann_accuracy=accuracy(ann_pred, data.y),
                      agreement=100.0 * float((snn_pred == ann_pred).float().mean()),
                      energy_ratio=counts.energy_ratio(e_ac, e_mac), ac_snn=counts.ac_snn, mac_snn=counts.mac_snn,
                      mac_ann=counts.mac_ann, host_ops=counts.host_ops, layers=counts.reported_layers())
