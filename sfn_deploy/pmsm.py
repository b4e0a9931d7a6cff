"""PMSM-R: polarity multi-spike mapping, reconstructed from the abstract (docs/methods.md).

Zhang, Li et al., "Quantization Meets Spikes: Lossless Conversion in the First Timestep via Polarity
Multi-Spike Mapping" (arXiv 2508.14520): only the abstract is available; every choice below is ours
([R] in shared/research/baseline-methods.md §2) and is listed in docs/methods.md.

1. At every neuron site a signed quantiser with K levels per polarity (round half up):
   q(z) = θ⁺·clip(⌊z/θ⁺ + ½⌋, 0, K) for z ≥ 0, −θ⁻·clip(⌊−z/θ⁻ + ½⌋, 0, K) for z < 0;
   one-sided (θ⁻ off) where the ANN has a ReLU (the site absorbs it) and after softmax.
2. θ± initialised per polarity by maximising the Shannon entropy of the quantised levels over clipping
   bounds λ = K·θ taken from a percentile grid of the calibration histogram.
3. A short quantisation-aware fine-tune of the weight layers and the θ's (straight-through estimator
   for the rounding, Adam, cross-entropy on the conversion data, progress bar).
4. The SNN at T = 1: each site becomes an ``sfn`` site with levels 1..K, step θ± and the paper's
   boundaries (k − ½)θ, i.e. a signed multi-spike neuron emitting up to K spikes in one step; it equals
   the fine-tuned quantised ANN, and, being an SFN network, it counts, reports and exports like one.
"""
from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from .calibrate import StreamingHistogram, site_histogram
from .ir import Graph, Node
from .passes import configure
from .progress import progress
from .simulators.interpreter import Event, Interpreter

PERCENTILE_GRID = (90.0, 95.0, 99.0, 99.5, 99.9, 99.99, 100.0)


def _cdf(h: StreamingHistogram, v: float) -> float:
    """Number of recorded values below v (linear within a bin)."""
    if v <= 0 or h.n == 0:
        return 0.0
    if v >= h.hi:
        return float(h.n)
    pos = v / h.hi * h.bins
    i = int(pos)
    below = float(h.counts[:i].sum())
    return below + float(h.counts[i]) * (pos - i)


def level_entropy(h: StreamingHistogram, theta: float, k: int) -> float:
    """Shannon entropy (bits) of the levels 0..K that one polarity's values quantise to with step θ."""
    if h.n == 0 or theta <= 0:
        return 0.0
    edges = [_cdf(h, (j + 0.5) * theta) for j in range(k)]
    mass = [edges[0]] + [b - a for a, b in zip(edges[:-1], edges[1:], strict=True)] + [h.n - edges[-1]]
    return -sum(m / h.n * math.log2(m / h.n) for m in mass if m > 0)


def entropy_init(h: StreamingHistogram, k: int) -> float:
    """θ = λ/K with λ the percentile of the grid whose quantised levels have the largest entropy."""
    best, best_theta = -1.0, 0.0
    for p in PERCENTILE_GRID:
        lam = h.quantile(p / 100.0)
        if lam <= 0:
            continue
        e = level_entropy(h, lam / k, k)
        if e > best + 1e-12:
            best, best_theta = e, lam / k
    return best_theta


def _round_ste(u: torch.Tensor) -> torch.Tensor:
    """⌊u + ½⌋ forward, identity backward."""
    return u + (torch.floor(u + 0.5) - u).detach()


def quantise(z: torch.Tensor, theta_pos: torch.Tensor, theta_neg: torch.Tensor | None, k: int) -> torch.Tensor:
    pos = theta_pos * torch.clamp(_round_ste(torch.clamp(z, min=0) / theta_pos), 0, k)
    if theta_neg is None:
        return pos
    return pos - theta_neg * torch.clamp(_round_ste(torch.clamp(-z, min=0) / theta_neg), 0, k)


class FakeQuantInterpreter(Interpreter):
    """The fake-quantised ANN, differentiable: the op table's operations, the quantiser at every ``sfn`` site
    (θ± = exp of the trained log-thresholds)."""

    def __init__(self, graph: Graph, thetas: dict, k: int):
        super().__init__(graph)
        self.thetas, self.k = thetas, k

    def fire(self, node: Node, args: list, event: Event) -> torch.Tensor:
        if node.op != "sfn":
            return super().fire(node, args, event)
        tp, tn = self.thetas[node.name]
        return quantise(args[0], tp.exp(), None if tn is None else tn.exp(), self.k)


def forward(graph: Graph, x: torch.Tensor, thetas: dict, k: int) -> torch.Tensor:
    """The fake-quantised ANN's output on ``x`` (:class:`FakeQuantInterpreter`)."""
    return FakeQuantInterpreter(graph, thetas, k).run(x)


def convert_pmsm(graph: Graph, data, k: int = 8, epochs: float = 1, lr: float = 1e-3, batch_size: int = 128,
                 seed: int = 0, quiet: bool = True) -> dict:
    """Entropy-initialise, fine-tune and turn every calibrated SFN site into a K-level signed multi-spike site
    (in place). Returns the fine-tune's record (losses, accuracy of the quantised ANN on its data)."""
    sites = graph.sites
    thetas: dict = {}
    for s in sites:
        a = s.attrs
        signed = not a.get("absorbs") and a["kind"] != "softmax"
        tp = entropy_init(site_histogram(s, 0), k) or 1.0
        tn = (entropy_init(site_histogram(s, 1), k) or tp) if signed else None
        thetas[s.name] = (torch.tensor(math.log(tp), requires_grad=True),
                          None if tn is None else torch.tensor(math.log(tn), requires_grad=True))
    weights = []
    for n in graph.nodes:
        if n.op in ("conv2d", "linear"):
            for key in ("weight", "bias"):
                if key in n.params:
                    n.params[key] = n.params[key].detach().clone().requires_grad_(True)
                    weights.append(n.params[key])
    scales = [t for pair in thetas.values() for t in pair if t is not None]
    opt = torch.optim.Adam([{"params": weights, "lr": lr}, {"params": scales, "lr": lr * 10}])
    g = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    correct = seen = 0
    steps = max(1, int(round(epochs * -(-len(data) // batch_size)))) if epochs > 0 else 0
    bar = progress(range(steps), "PMSM fine-tune", quiet=quiet, total=steps)
    batches: Iterator[torch.Tensor] = iter(())
    images = data.in_memory().x       # shuffled mini-batches need random access: the fine-tune set is decoded once
    try:
        for _ in bar:
            idx = next(batches, None)
            if idx is None:
                batches = iter(torch.randperm(len(data), generator=g).split(batch_size))
                idx = next(batches)
            with torch.enable_grad():
                logits = forward(graph, images[idx], thetas, k)
                loss = F.cross_entropy(logits, data.y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
            losses.append(float(loss.detach()))
            correct += int((logits.argmax(-1) == data.y[idx]).sum())
            seen += len(idx)
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
    finally:
        for n in graph.nodes:
            for key in ("weight", "bias"):
                if key in n.params and n.params[key].requires_grad:
                    n.params[key] = n.params[key].detach()
    for s in sites:
        tp, tn = thetas[s.name]
        a = s.attrs
        if a["kind"] == "softmax":
            a["kind"] = "dual"
        a.update({"method": "pmsm", "T": 1, "fire": "pmsm", "M": int(k), "levels": list(range(1, k + 1)),
                  "rounding": "paper", "lam": 1.0, "theta_pos": float(tp.detach().exp()),
                  "theta_neg": 0.0 if tn is None else float(tn.detach().exp())})
        configure(s, 1.0)
    graph.method, graph.timesteps = "pmsm", 1
    return {"steps": steps, "epochs": epochs, "lr": lr, "levels": k, "loss_first": losses[0] if losses else None,
            "loss_last": losses[-1] if losses else None, "train_accuracy": 100.0 * correct / max(seen, 1)}
