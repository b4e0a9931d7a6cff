"""How a converted network is compared with its ANN: one per-sample score, whatever the model returns.

The λ search, the reported drop, bias correction's check, ``evaluate`` and ``report`` all score each sample the
same way (docs/concepts.md "Fidelity"):

* ``accuracy`` (a classifier: one N×classes output): 1 when the top-1 class is the sample's label, else 0.
  Without labels the ANN's own top-1 is the label, so the SNN's "accuracy" is its agreement with the ANN and
  the ANN's is 100 %: the search then keeps the SNN's decisions, which is what a deployed classifier needs.
* ``output`` (anything else: a backbone's features, a map; or asked for): the cosine similarity of the
  sample's flattened SNN output with the ANN's (the ANN scores 1). A backbone's consumer (a retrieval index,
  a detection head trained on the ANN) sees the direction of its features; the scale is reported too, as the
  relative error.

The drop is ANN − SNN in points of 100 × the mean score, with a paired 95 % interval: Tango's for the 0/1
scores (evaluation.paired_drop), a normal interval of the mean per-sample difference for cosines (n is the
validation set's, a thousand or more, where the mean is close to normal).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

import torch

from .errors import UserError

KINDS = ("auto", "accuracy", "output")
# two outputs with norms below this are both "zero": they agree (cosine 1) rather than being undefined
_TINY = 1e-12


# ops a classifier's logits may pass through after its last weight layer (pooling a 1×1-conv head, flattening)
_AFTER_HEAD = {"flatten", "reshape", "squeeze", "mean", "avg_pool2d", "adaptive_avg_pool2d", "select", "slice"}


def ends_in_weight_layer(graph) -> bool:
    """Whether the output comes from a linear or convolution layer (through pooling and layout ops): a
    classifier's head. A backbone's output comes from an activation, a norm or a pool of one."""
    node = graph[graph.output]
    while node.op in _AFTER_HEAD and node.inputs:
        node = graph[node.inputs[0]]
    return node.op in ("linear", "conv2d", "conv1d")


def resolve(requested: str, out_shape: list[int], model: object = None, several: bool = False,
            headless: bool = False) -> str:
    """The kind a conversion uses. ``auto``: ``output`` when the model does not return one N×classes tensor
    (``several``: it returns more than one), is a timm model built without its head (``num_classes=0``) or,
    with ``headless`` (the caller's judgement: unlabeled data and no weight layer at the output), looks like a
    backbone; else ``accuracy``."""
    if requested not in KINDS:
        raise UserError(f"fidelity {requested!r}: choose one of {', '.join(KINDS)}")
    if requested == "accuracy" and (len(out_shape) != 2 or several):
        shape = "several tensors" if several else f"shape {'×'.join(map(str, out_shape))}"
        raise UserError(f"--fidelity accuracy needs a classifier returning N×classes; the model's output has "
                        f"{shape} (use --fidelity output)")
    if requested != "auto":
        return requested
    if len(out_shape) != 2 or several or headless or getattr(model, "num_classes", None) == 0:
        return "output"
    return "accuracy"


def of(converted_config: dict) -> str:
    """The kind recorded in a converted model (files written before fidelity was recorded: accuracy)."""
    kind = converted_config.get("fidelity") or "accuracy"
    return "accuracy" if kind == "auto" else kind


def cosine(out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Per-sample cosine similarity of two batches, each sample flattened (both zero: 1, one zero: 0)."""
    a, b = out.flatten(1).double(), ref.flatten(1).double()
    na, nb = a.norm(dim=1), b.norm(dim=1)
    cos = (a * b).sum(1) / (na * nb).clamp_min(_TINY)
    return torch.where((na < _TINY) & (nb < _TINY), torch.ones_like(cos), cos).clamp(-1.0, 1.0).float()


def part_cosines(out: torch.Tensor, ref: torch.Tensor, parts: list[list[int]]) -> torch.Tensor:
    """N × P: the cosine of each joined output part (:attr:`Graph.output_parts`) on its own."""
    sizes = [math.prod(p) for p in parts]
    pairs = zip(out.flatten(1).split(sizes, dim=1), ref.flatten(1).split(sizes, dim=1), strict=True)
    return torch.stack([cosine(a, b) for a, b in pairs], dim=1)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Per-sample ‖SNN − ANN‖ / ‖ANN‖ (each sample flattened)."""
    a, b = out.flatten(1).double(), ref.flatten(1).double()
    return ((a - b).norm(dim=1) / b.norm(dim=1).clamp_min(_TINY)).float()


@dataclass
class Reference:
    """What each sample's SNN output is scored against, and the ANN's own scores.

    ``target``: labels or the ANN's top-1 (``accuracy``; N integers), or the ANN's outputs (``output``)."""
    kind: str
    target: torch.Tensor
    ann: torch.Tensor               # per-sample ANN score (float)

    @property
    def binary(self) -> bool:
        return self.kind == "accuracy"

    def scores(self, out: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Per-sample scores of a batch of SNN outputs that begins at sample ``start`` of the reference."""
        ref = self.target[start:start + out.shape[0]]
        if self.kind == "output":
            return cosine(out, ref)
        return (out.argmax(-1) == ref).float()

    def __len__(self) -> int:
        return len(self.ann)

    def subset(self, index: torch.Tensor) -> Reference:
        return Reference(self.kind, self.target[index], self.ann[index])


def reference(kind: str, ann_out: torch.Tensor, labels: torch.Tensor | None) -> Reference:
    """The reference for ANN outputs ``ann_out`` (N × …) and the samples' labels (None: unlabeled)."""
    n = ann_out.shape[0]
    if kind == "output":
        return Reference("output", ann_out, torch.ones(n))
    top1 = ann_out.argmax(-1)
    if labels is None:
        return Reference("accuracy", top1, torch.ones(n))
    return Reference("accuracy", labels, (top1 == labels).float())


def scores(kind: str, snn: torch.Tensor, ann: torch.Tensor, labels: torch.Tensor | None) -> tuple[float, float]:
    """(SNN, ANN) score in % of finished passes, as the search scores a trial: accuracy against the labels;
    without labels the agreement with the ANN's top-1, or with output fidelity 100 × the mean cosine with the
    ANN's outputs (the ANN scores 100 either way). ``snn``, ``ann``: top-1 classes, or outputs (``output``)."""
    if kind == "output":
        return 100.0 * float(cosine(snn, ann).mean()), 100.0
    if labels is None:
        return 100.0 * float((snn == ann).float().mean()), 100.0
    return 100.0 * float((snn == labels).float().mean()), 100.0 * float((ann == labels).float().mean())


def z_value(confidence: float) -> float:
    """The two-sided normal quantile of a confidence level (1.96 for 0.95)."""
    return NormalDist().inv_cdf(0.5 + confidence / 2)


def normal_interval(diff: torch.Tensor, confidence: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high) of per-sample paired differences, the normal interval of the mean."""
    d = diff.double()
    return (float(d.mean()), *interval_from_moments(float(d.sum()), float((d * d).sum()), len(d), confidence))


def interval_from_moments(total: float, squares: float, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """The normal interval of a mean from the sum and the sum of squares of n values (what a search trial
    records instead of every value)."""
    mean = total / n
    var = max(0.0, (squares - n * mean * mean) / (n - 1)) if n > 1 else math.inf
    half = z_value(confidence) * math.sqrt(var / n)
    return mean - half, mean + half
