"""Evaluating a network, apart from converting it: accuracy, agreement with the ANN, op counts and the
paper's energy ratio, on the reference interpreter or on any backend of :mod:`sfn_deploy.backends`.

The λ search, ``simulate``, ``report`` and the CLI read this module; it reads no conversion code, so
imports flow one way (capture → passes → calibrate → search → backends/simulators → reports → CLI).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from . import backends, distributed, fidelity
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
    accuracy: float | None              # SNN top-1, % (None: unlabeled data)
    ann_accuracy: float | None          # source ANN top-1, % (None: unlabeled data)
    agreement: float | None             # SNN/ANN top-1 agreement, % (None: output fidelity)
    energy_ratio: float                 # the paper's eq. 43: SNN energy / ANN energy at 45 nm CMOS prices
    ac_snn: float                       # accumulates per inference (spike convention)
    mac_snn: float                      # MACs per inference of layers with analog input
    mac_ann: float                      # MACs per inference of the source ANN
    host_ops: float                     # host operations per inference
    layers: list[dict[str, Any]] | None = optional()   # per-layer op counts per inference (None: left out)
    drop: PairedDrop | None = optional()               # ANN − SNN accuracy with its paired 95 % interval
    fidelity: str | None = optional()                  # "output": scored by cosine similarity (None: accuracy)
    cosine: float | None = optional()                  # output fidelity: mean SNN/ANN cosine similarity
    relative_error: float | None = optional()          # output fidelity: mean ‖SNN − ANN‖ / ‖ANN‖, %
    cosine_parts: list[float] | None = optional()      # several joined outputs: each one's mean cosine


@dataclass
class PairedDrop(Result):
    """The drop ANN − SNN in points, measured on the same images, with its confidence interval.

    Accuracy: ``ann_only`` counts images the ANN gets right and the SNN wrong, ``snn_only`` the reverse; only
    these discordant pairs carry information about the drop (see :func:`paired_drop`). Output fidelity: points
    of 100 × cosine similarity, without the counts (:func:`drop_of`)."""
    points: float                       # 100 · (ann_only − snn_only) / n
    low: float                          # interval, points
    high: float
    confidence: float                   # 0.95
    n: int                              # images
    ann_only: int | None = optional()
    snn_only: int | None = optional()
    method: str = "Tango score interval, paired"


def energy_constants(target: str = "cmos45") -> tuple[float, float]:
    """Energy of one accumulate and one multiply-accumulate (pJ), the paper's energy-ratio constants."""
    t = load_target(target)
    ac, mac = t.get("energy_pj", "ac"), t.get("energy_pj", "mac")
    if ac is None or mac is None:
        raise UserError(f"target {target}: energy_pj needs ac and mac for the energy ratio")
    return ac, mac


def check_data(graph: Graph, data: Dataset, where: str = "model", kind: str = "accuracy") -> None:
    """The samples fit the network's input; for ``accuracy`` fidelity, the labels fit its classes."""
    want = list(graph.input.shape[1:])
    got = data.sample_shape
    if want != got:
        raise UserError(f"{data.name}: samples have shape {'×'.join(map(str, got))} but the {where} expects "
                        f"{'×'.join(map(str, want))}")
    out_shape = graph[graph.output].shape
    if kind == "accuracy" and len(out_shape) == 2 and len(data) and int(data.y.max()) >= out_shape[1]:
        raise UserError(f"{data.name}: labels go up to {int(data.y.max())} but the {where} has {out_shape[1]} "
                        "outputs")


def accuracy(pred: torch.Tensor, y: torch.Tensor) -> float:
    return 100.0 * float((pred == y).float().mean())


def labeled_accuracy(pred: torch.Tensor, data: Dataset) -> float | None:
    """Top-1 accuracy in %, or None for unlabeled data (docs/data.md: what unlabeled runs report)."""
    return accuracy(pred, data.y) if data.labeled else None


def tango_interval(ann_only: int, snn_only: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Tango's asymptotic score interval for the difference of two paired proportions, as fractions.

    T. Tango, "Equivalence test and confidence interval for the difference in proportions for the
    paired-sample design", Statistics in Medicine 17 (1998) 891-908 (correction: 18 (1999) 3511), one of
    the intervals recommended by Fagerland, Lydersen & Laake, Statistics in Medicine 33 (2014) 2850-2875.
    With b = ann_only, c = snn_only, the interval is every Δ with |T(Δ)| ≤ z, where

        T(Δ) = (b − c − nΔ) / √(n (2 q̃ + Δ(1 − Δ))),
        q̃ = (√(B² − 4AC) − B) / 2A,  A = 2n,  B = −b − c + (2n − b + c)Δ,  C = −cΔ(1 − Δ)

    (q̃: the maximum-likelihood estimate of P(SNN right, ANN wrong) given Δ). T falls monotonically in Δ, so
    each limit is found by bisection between the estimate and ±1. Unlike the Wald interval it keeps a width
    when there are no discordant pairs (then the limits are ±z²/(n + z²), the Wilson bound of zero events)
    and stays inside [−1, 1] for any n ≥ 1.
    """
    if n < 1 or ann_only < 0 or snn_only < 0 or ann_only + snn_only > n:
        raise ValueError(f"paired counts need 0 ≤ ann_only + snn_only ≤ n, n ≥ 1; got {ann_only}, {snn_only}, {n}")
    b, c, z = ann_only, snn_only, fidelity.z_value(confidence)

    def score(delta: float) -> float:
        bb = -b - c + (2 * n - b + c) * delta
        cc = -c * delta * (1 - delta)
        q = (math.sqrt(max(0.0, bb * bb - 8 * n * cc)) - bb) / (4 * n)
        num = b - c - n * delta
        var = n * (2 * q + delta * (1 - delta))
        if num == 0:
            return 0.0
        return num / math.sqrt(var) if var > 0 else math.copysign(math.inf, num)

    def limit(inside: float, outside: float) -> float:
        if abs(score(outside)) <= z:
            return outside
        for _ in range(100):        # the interval [inside, outside] halves each step: exact to 1e-15
            mid = (inside + outside) / 2
            inside, outside = (mid, outside) if abs(score(mid)) <= z else (inside, mid)
        return inside

    est = (b - c) / n
    return limit(est, -1.0), limit(est, 1.0)


def paired_drop(ann_correct: torch.Tensor | Sequence[bool], snn_correct: torch.Tensor | Sequence[bool],
                confidence: float = 0.95) -> PairedDrop:
    """The drop ANN − SNN in accuracy points on the same n images, with a paired confidence interval.

    Per image d = [ANN right] − [SNN right]; the drop is 100·mean(d). Images both get right (or both wrong)
    cancel, so the uncertainty comes from the discordant pairs alone, which makes the interval far tighter
    than one built from the two accuracies separately. The interval is :func:`tango_interval`'s.
    """
    a = torch.as_tensor(ann_correct, dtype=torch.bool).flatten()
    s = torch.as_tensor(snn_correct, dtype=torch.bool).flatten()
    if a.shape != s.shape or not len(a):
        raise ValueError(f"paired_drop needs two equally long, non-empty vectors; got {len(a)} and {len(s)}")
    b, c, n = int((a & ~s).sum()), int((s & ~a).sum()), len(a)
    low, high = tango_interval(b, c, n, confidence)
    return PairedDrop(points=100.0 * (b - c) / n, low=100.0 * low, high=100.0 * high, confidence=confidence,
                      n=n, ann_only=b, snn_only=c)


def drop_of(ann: torch.Tensor, snn: torch.Tensor, binary: bool, confidence: float = 0.95) -> PairedDrop:
    """The drop of per-sample SNN scores against the ANN's (:class:`fidelity.Reference`): :func:`paired_drop`
    for 0/1 scores (accuracy), the normal interval of the mean difference (points of 100 × cosine) for output
    fidelity."""
    if binary:
        return paired_drop(ann > 0.5, snn > 0.5, confidence)
    mean, low, high = fidelity.normal_interval(100.0 * (ann - snn), confidence)
    return PairedDrop(points=mean, low=low, high=high, confidence=confidence, n=len(snn),
                      method="normal interval of the mean paired difference")


def _points(v: float, digits: int) -> str:
    text = f"{v:.{digits}f}"
    return "0" + text[2:] if text.startswith("-") and float(text) == 0 else text.replace("-", "−")


def format_drop(d: PairedDrop) -> str:
    """``drop 0.40 points (95 % CI −0.10 to 0.90, paired, n = 2,000)``; output fidelity: ``… points of
    cosine``."""
    unit = "points" if d.ann_only is not None else "points of 100·cosine"
    return (f"drop {_points(d.points, 2)} {unit} ({100 * d.confidence:g} % CI {_points(d.low, 2)} to "
            f"{_points(d.high, 2)}, paired, n = {d.n:,})")


def resolution(n: int, confidence: float = 0.95) -> float:
    """The smallest drop (points) that n validation images can tell from zero: the upper limit of the paired
    interval when the SNN and ANN agree on every image (no discordant pair), 100·z²/(n + z²)."""
    z2 = fidelity.z_value(confidence) ** 2
    return 100.0 * z2 / (n + z2)


def images_needed(max_drop: float, confidence: float = 0.95) -> int | None:
    """The fewest validation images whose :func:`resolution` is at most ``max_drop`` points: z²(100/D − 1)
    (about 1,280 for 0.3 points, 380 for 1 point); None for D = 0 (no finite set resolves it)."""
    if max_drop <= 0:
        return None
    if max_drop >= 100:
        return 1
    return max(1, math.ceil(fidelity.z_value(confidence) ** 2 * (100.0 / max_drop - 1) - 1e-9))


def _short(v: float) -> str:
    return f"{v:.0f}" if v >= 10 else f"{v:.2g}"


def budget_warning(n: int, max_drop: float | None, available: int | None = None) -> str | None:
    """One line when ``n`` validation images cannot resolve a ``--max-drop`` budget, saying how many would;
    None when they can. The rule: the budget must be at least :func:`resolution` (n), the drop that even a
    validation set without a single SNN/ANN disagreement cannot tell from zero. ``available``: how many images
    validation could draw from (for the advice)."""
    if max_drop is None:
        return None
    need = images_needed(max_drop)
    if need is not None and n >= need:
        return None
    head = (f"{n:,} validation image{'s resolve' if n != 1 else ' resolves'} {_short(100.0 / n)} points (one image; "
            f"a drop below {_short(resolution(n))} cannot be told from zero)")
    if need is None:
        return f"{head}; --max-drop 0 is resolved by no finite validation set"
    how = ("use --val-size or --val-data" if available is None else f"use --val-size {need}" if available >= need
           else f"only {available:,} images are available: give more with --val-data")
    return f"{head}; --max-drop {max_drop:g} needs at least {need:,} ({how})"


def measure(graph: Graph, data: Dataset, batch_size: int = 256, spiking: bool = True,
            quiet: bool = True, desc: str = "evaluating", split: bool = False,
            top1: bool = True) -> tuple[torch.Tensor, OpCounter]:
    """Predictions (argmax; the outputs themselves without ``top1``) and op counts of one pass over the data.
    ``split``: under torchrun, each rank runs its share (:mod:`sfn_deploy.distributed`) and every rank gets the
    whole pass's predictions and counts; every rank must then call it alike (evaluate and report do; the λ
    search does not split)."""
    counter = OpCounter(graph, spiking)
    preds = _pass(graph, data, batch_size, spiking, quiet, desc, split, counter, top1)
    if split and distributed.active():
        counter.absorb(distributed.gather(counter.state()))
    return preds, counter


def predict(graph: Graph, data: Dataset, batch_size: int = 256, spiking: bool = False,
            quiet: bool = True, desc: str = "evaluating", split: bool = False, top1: bool = True) -> torch.Tensor:
    """Predictions (argmax; the outputs without ``top1``) of one pass, nothing counted: the ANN reference of
    evaluate and report (the counts they report are the SNN pass's, whose counter also holds the ANN's MACs).
    ``split`` as in :func:`measure`."""
    return _pass(graph, data, batch_size, spiking, quiet, desc, split, None, top1)


def _pass(graph: Graph, data: Dataset, batch_size: int, spiking: bool, quiet: bool, desc: str, split: bool,
          counter: OpCounter | None, top1: bool = True) -> torch.Tensor:
    preds = [torch.zeros(0, dtype=torch.int64)] if top1 else []
    part = distributed.shard(data, batch_size) if split else data
    for xb in progress(part.batches(batch_size), desc, quiet=quiet, total=-(-len(part) // batch_size)):
        if counter is not None:
            counter.start_batch(xb.shape[0])
        out = run(graph, xb, spiking=spiking, hook=counter)
        preds.append(out.argmax(-1) if top1 else out)
    if split and distributed.active():
        return distributed.gather_cat(torch.cat(preds))
    return torch.cat(preds)


def ann_reference(graph: Graph, data: Dataset, kind: str, batch_size: int = 256) -> fidelity.Reference:
    """What the SNN's outputs on ``data`` are scored against (:func:`fidelity.reference`), from one ANN pass."""
    out = torch.cat([run(graph, xb, spiking=False) for xb in data.batches(batch_size)])
    return fidelity.reference(kind, out, data.y if data.labeled else None)


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


def _scores(graph: Graph, snn: torch.Tensor, ann: torch.Tensor) -> torch.Tensor:
    """N × (2 + P): per sample the cosine, the relative error and each joined output part's cosine."""
    cols = [fidelity.cosine(snn, ann)[:, None], fidelity.relative_error(snn, ann)[:, None]]
    if graph.output_parts:
        cols.append(fidelity.part_cosines(snn, ann, graph.output_parts))
    return torch.cat(cols, dim=1)


def compare_outputs(graph: Graph, data: Dataset, batch_size: int = 256, quiet: bool = True, desc: str = "comparing",
                    split: bool = False) -> tuple[torch.Tensor, OpCounter]:
    """Output fidelity in one pass: per sample the cosine similarity and relative error of the SNN's outputs
    against the ANN's on the same batch (and each joined part's cosine: :func:`_scores`), and the SNN's op
    counts. A few numbers per sample are kept, never the outputs (a backbone's feature maps would grow with the
    data). ``split`` as in :func:`measure`."""
    counter = OpCounter(graph, True)
    scores = [torch.zeros(0, 2 + len(graph.output_parts or []))]
    part = distributed.shard(data, batch_size) if split else data
    for xb in progress(part.batches(batch_size), desc, quiet=quiet, total=-(-len(part) // batch_size)):
        counter.start_batch(xb.shape[0])
        snn = run(graph, xb, spiking=True, hook=counter)
        scores.append(_scores(graph, snn, run(graph, xb, spiking=False)))
    out = torch.cat(scores)
    if split and distributed.active():
        counter.absorb(distributed.gather(counter.state()))
        return distributed.gather_cat(out), counter
    return out, counter


def evaluate(converted: ConvertedModel, data: Dataset, backend: str = "torch", limit: int | None = None,
             batch_size: int = 256, quiet: bool = True, target: str = "cmos45",
             lava: dict | None = None) -> Evaluation:
    """Accuracy of SNN and ANN, their top-1 agreement and the op counts / energy ratio (paper convention); for
    a model converted with output fidelity (:mod:`sfn_deploy.fidelity`), the outputs' cosine similarity instead.

    The op counts are always the reference interpreter's; on another backend the predictions are its own."""
    backends.get(backend)
    if backend != backends.REFERENCE and distributed.active():
        raise UserError(f"--backend {backend} runs in one process; under torchrun use the torch backend")
    data = data.limit(limit)
    graph = converted.graph
    kind = fidelity.of(converted.config)
    check_data(graph, data, "converted model", kind)
    if kind == "output":
        if backend == backends.REFERENCE:
            scores, counter = compare_outputs(graph, data, batch_size, quiet=quiet, desc="SNN and ANN", split=True)
        else:                   # the counts from the reference; the outputs compared are the backend's own
            counter = measure(graph, data, batch_size, spiking=True, quiet=quiet, desc="SNN", split=True)[1]
            ann = backend_logits(converted, data, backend, batch_size, ann=True, quiet=quiet)
            snn = backend_logits(converted, data, backend, batch_size, quiet=quiet, lava=lava)
            scores = _scores(graph, snn, ann)
        return _output_evaluation(backend, scores, counter, target)
    snn_pred, counter = measure(graph, data, batch_size, spiking=True, quiet=quiet, desc="SNN", split=True)
    if backend == backends.REFERENCE:
        ann_pred = predict(graph, data, batch_size, quiet=quiet, desc="ANN", split=True)
    else:
        ann_pred = backend_logits(converted, data, backend, batch_size, ann=True, quiet=quiet).argmax(-1)
        snn_pred = backend_logits(converted, data, backend, batch_size, quiet=quiet, lava=lava).argmax(-1)
    return _accuracy_evaluation(backend, data, snn_pred, ann_pred, counter, target)


def from_passes(kind: str, data: Dataset, snn: torch.Tensor, ann: torch.Tensor, counter: OpCounter,
                target: str = "cmos45") -> Evaluation:
    """The reference backend's :func:`evaluate` from passes already run over ``data`` (bias correction's check
    runs them): top-1 classes (accuracy) or the outputs (output fidelity) of the SNN and the ANN, and the
    SNN pass's op counter."""
    if kind == "output":
        return _output_evaluation(backends.REFERENCE, _scores(counter.graph, snn, ann), counter, target)
    return _accuracy_evaluation(backends.REFERENCE, data, snn, ann, counter, target)


def _counted(counter: OpCounter, target: str) -> dict[str, Any]:
    counts = counter.result()
    e_ac, e_mac = energy_constants(target)
    return dict(energy_ratio=counts.energy_ratio(e_ac, e_mac), ac_snn=counts.ac_snn, mac_snn=counts.mac_snn,
                mac_ann=counts.mac_ann, host_ops=counts.host_ops, layers=counts.reported_layers())


def accuracy_figures(data: Dataset, snn_pred: torch.Tensor, ann_pred: torch.Tensor) -> dict[str, Any]:
    """The fidelity fields of an :class:`Evaluation` (or a report) from the SNN's and the ANN's top-1 classes."""
    return dict(accuracy=labeled_accuracy(snn_pred, data), ann_accuracy=labeled_accuracy(ann_pred, data),
                agreement=100.0 * float((snn_pred == ann_pred).float().mean()),
                drop=paired_drop(ann_pred == data.y, snn_pred == data.y) if data.labeled else None)


def _accuracy_evaluation(backend: str, data: Dataset, snn_pred: torch.Tensor, ann_pred: torch.Tensor,
                         counter: OpCounter, target: str) -> Evaluation:
    return Evaluation(backend=backend, samples=len(snn_pred), **_counted(counter, target),
                      **accuracy_figures(data, snn_pred, ann_pred))


def output_figures(scores: torch.Tensor) -> dict[str, Any]:
    """The fidelity fields of an :class:`Evaluation` (or a report) from :func:`compare_outputs`' scores."""
    cos, rel, parts = scores[:, 0], scores[:, 1], scores[:, 2:]
    return dict(accuracy=None, ann_accuracy=None, agreement=None,
                drop=drop_of(torch.ones(len(cos)), cos, binary=False), fidelity="output",
                cosine=float(cos.mean()), relative_error=100.0 * float(rel.mean()),
                cosine_parts=[float(v) for v in parts.mean(0)] if parts.shape[1] else None)


def _output_evaluation(backend: str, scores: torch.Tensor, counter: OpCounter, target: str) -> Evaluation:
    return Evaluation(backend=backend, samples=len(scores), **_counted(counter, target), **output_figures(scores))
