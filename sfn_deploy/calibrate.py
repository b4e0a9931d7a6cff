"""Threshold calibration from data with bounded memory.

Each SFN site keeps two streaming histograms (positive values, magnitudes of
negative values) whose range doubles, merging bin pairs exactly, when a larger
value arrives. Memory per site is fixed (``bins`` counters) whatever the data size,
and a quantile is exact up to one bin width (range / bins).

Each site also keeps, per channel, the value its input takes most often and how often
(:class:`RepeatedValues`): a constant background, zero padding or a channel where only the
bias survives gives one exact value at many positions at once. ``passes.configure`` keeps the
firing boundaries from switching such a value off (docs/concepts.md, "Repeated values").
"""
from __future__ import annotations

import math

import torch

from . import distributed
from .errors import UserError
from .ir import Graph
from .passes import configure
from .progress import progress
from .simulators.firegrid import count_equal, mode_rows, signed_counts
from .simulators.interpreter import Event, Observer, run


class StreamingHistogram:
    """Histogram of non-negative values on [0, hi) with hi doubling on demand."""

    def __init__(self, bins: int = 4096):
        self.bins = bins
        self.counts = torch.zeros(bins, dtype=torch.float64)
        self.hi = 0.0
        self.max = 0.0
        self.n = 0

    def update(self, values: torch.Tensor) -> None:
        values = values.detach().reshape(-1).to(torch.float64)
        if values.numel() == 0:
            return
        self.fit(float(values.max()))
        self.n += values.numel()
        idx = (values / self.hi * self.bins).long().clamp_(0, self.bins - 1)
        self.counts += torch.bincount(idx, minlength=self.bins).to("cpu", torch.float64)

    def fit(self, m: float) -> None:
        """Widen the range (doubling, merging bin pairs) until it holds ``m`` (a value about to be counted).

        The range is always a power of two: whatever order the values come in (and however the data is split
        between processes), the bins end up the same, and a value's bin index is an exact product."""
        self.max = max(self.max, m)
        if self.hi == 0.0:
            self.hi = 2.0 ** math.ceil(math.log2(m)) if m > 0 else 1.0
        self.widen(m)

    def widen(self, m: float) -> None:
        """Double the range (merging bin pairs, which is exact) until it is above ``m``."""
        while m >= self.hi:
            self.counts = torch.cat([self.counts.view(-1, 2).sum(1), torch.zeros(self.bins // 2, dtype=torch.float64)])
            self.hi *= 2

    def quantile(self, q: float) -> float:
        """Value below which a fraction q of the samples lie (linear within a bin, never above the max)."""
        if self.n == 0:
            return 0.0
        if q >= 1.0:
            return self.max
        target = q * self.n
        cum = torch.cumsum(self.counts, 0)
        i = int(torch.searchsorted(cum, torch.tensor(target, dtype=torch.float64)))
        i = min(i, self.bins - 1)
        below = float(cum[i - 1]) if i > 0 else 0.0
        width = self.hi / self.bins
        frac = (target - below) / float(self.counts[i]) if self.counts[i] > 0 else 0.0
        return min(i * width + frac * width, self.max)


def top_percent(hist: StreamingHistogram, p: float) -> float:
    """θ as the top-p% largest value: the (100 − p)th percentile (p = 0 gives the maximum)."""
    return hist.quantile(1.0 - p / 100.0)


def update_signed(pos: StreamingHistogram, neg: StreamingHistogram, x: torch.Tensor) -> None:
    """Count the positive values of ``x`` into ``pos`` and the magnitudes of its negative ones into ``neg``
    (zeros into neither), in one pass: no masked copies, bin indices in float32. The same counts as
    ``pos.update(x[x > 0]); neg.update(-x[x < 0])`` up to float32 rounding at a bin edge (calibration's cost
    is this function on every site of every batch: a ViT's attention maps are millions of values each)."""
    x = x.detach().reshape(-1).to(torch.float32)
    if x.numel() == 0:
        return
    lo, hi = (float(v) for v in torch.aminmax(x))
    if math.isinf(lo) or math.isinf(hi):
        raise UserError("the ANN's activations overflow float32 (±inf) on the calibration data: the model's "
                        "weights or its inputs are out of range")
    if hi > 0:
        pos.fit(hi)
    if lo < 0:
        neg.fit(-lo)
    b = pos.bins
    sp, sn = b / pos.hi if pos.hi else 0.0, -b / neg.hi if neg.hi else 0.0
    native = signed_counts(x, sp, sn, b)                    # the same counts in one pass, where it is built
    if native is not None:
        counts = native.to(torch.float64)
    else:
        positive = x > 0
        scale = torch.where(positive, sp, sn)
        idx = (x * scale).long().clamp_(0, b - 1)           # truncation is floor: x · scale ≥ 0
        idx += (~positive).long() * b                       # negatives (and zeros, removed below) after b
        counts = torch.bincount(idx, minlength=2 * b).to("cpu", torch.float64)  # (a GPU's counts: to the host)
        counts[b] -= x.numel() - int(torch.count_nonzero(x))    # zeros landed in the first negative bin
    pos.counts += counts[:b]
    neg.counts += counts[b:]
    pos.n += int(round(float(counts[:b].sum())))
    neg.n += int(round(float(counts[b:].sum())))


def channel_axis(x: torch.Tensor) -> int:
    """The axis whose entries are a site's channels: 1 of an N×C×H×W activation, else the last (features)."""
    return 1 if x.dim() == 4 else x.dim() - 1


def _mode(s: torch.Tensor) -> torch.Tensor:
    """Each row's most frequent value (torch.mode's, ties to the smallest): the native hash count where it runs."""
    native = mode_rows(s)
    return s.mode(dim=1).values if native is None else native


def _count_equal(x: torch.Tensor, value: torch.Tensor, inner: int) -> torch.Tensor:
    """Per channel, how many entries of ``x`` (outer × C × ``inner``) equal that channel's ``value``."""
    native = count_equal(x, value, inner)
    if native is not None:
        return native
    return (x.reshape(-1, value.numel(), inner) == value.view(1, -1, 1)).sum((0, 2))


class RepeatedValues:
    """Per channel, the value a site's input takes most often and the share of positions where it does.

    Each batch, every channel's most frequent exact value (``torch.mode`` of an evenly spaced sample of at
    most ``sample`` of its values) and its count (over all of them) are added to that channel's
    candidates; at most ``keep`` candidates per channel are kept (the most counted). A value's count is
    therefore summed over the batches where it was the channel's most frequent one: exact for a value
    that dominates every batch (a background), a lower bound otherwise. Memory: ``keep`` pairs per
    channel, whatever the data size.
    """

    def __init__(self, keep: int = 4, sample: int = 4096):
        self.keep, self.sample = keep, sample
        self.candidates: list[dict[float, int]] = []
        self.positions = 0            # values seen per channel

    def update(self, x: torch.Tensor) -> None:
        if x.dim() < 2 or x.numel() == 0:
            return
        x = x.detach()
        if x.dim() == 4:                # N×C×H×W: positions are (image, pixel); no channel-first copy
            v = x.reshape(x.shape[0], x.shape[1], -1)
            positions = v.shape[0] * v.shape[2]
            at = torch.arange(0, positions, max(1, positions // self.sample), device=x.device)
            sample = v[at // v.shape[2], :, at % v.shape[2]]                    # positions × C
            mode = _mode(sample.T.contiguous())
            counts = _count_equal(v, mode, v.shape[2])
        else:                           # channels last (features, tokens)
            v = x.reshape(-1, x.shape[-1])
            positions = v.shape[0]
            mode = _mode(v[::max(1, positions // self.sample)].T.contiguous())
            counts = _count_equal(v, mode, 1)
        if not self.candidates:
            self.candidates = [{} for _ in range(mode.shape[0])]
        if mode.shape[0] != len(self.candidates):
            return                    # (a site's channel count does not change between batches)
        for c, (v, k) in enumerate(zip(mode.tolist(), counts.tolist(), strict=True)):
            cand = self.candidates[c]
            cand[v] = cand.get(v, 0) + int(k)
            if len(cand) > self.keep:                          # ties: the larger value goes (any order)
                del cand[min(cand, key=lambda v: (cand[v], -v))]
        self.positions += positions

    def absorb(self, others: list[RepeatedValues]) -> None:
        """Become the sum of ``others`` (the ranks' candidates, in rank order): counts of a value added, the
        ``keep`` most counted kept. Equal to one process's candidates wherever no channel saw more than
        ``keep`` different batch modes (always for a value that dominates every batch)."""
        width = max((len(o.candidates) for o in others), default=0)
        merged: list[dict[float, int]] = [{} for _ in range(width)]
        for o in others:
            for c, cand in enumerate(o.candidates):
                for v, k in cand.items():
                    merged[c][v] = merged[c].get(v, 0) + k
        self.candidates = [dict(sorted(m.items(), key=lambda kv: (-kv[1], kv[0]))[:self.keep]) for m in merged]
        self.positions = sum(o.positions for o in others)

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(value, share) per channel, float32: each channel's most counted value and its count / positions."""
        best = [max(c.items(), key=lambda kv: (kv[1], -kv[0])) if c else (0.0, 0) for c in self.candidates]
        value = torch.tensor([v for v, _ in best], dtype=torch.float32)
        share = torch.tensor([k / max(self.positions, 1) for _, k in best], dtype=torch.float32)
        return value, share


class _SiteInputs(Observer):
    """Streams the ANN's input to every ``sfn`` site into that site's two histograms and repeated values."""

    def __init__(self, pos: dict, neg: dict, modes: dict):
        self.pos, self.neg, self.modes = pos, neg, modes

    def __call__(self, event: Event) -> None:
        if event.node.op == "sfn":
            x = event.args[0]
            try:
                update_signed(self.pos[event.node.name], self.neg[event.node.name], x)
            except UserError as e:
                raise UserError(f"site {event.node.name}: {e}") from None
            self.modes[event.node.name].update(x)


def _sum_ranks(pos: dict, neg: dict, modes: dict) -> None:
    """Every rank's histograms and repeated values summed into each rank's (the same bins: ranges are powers of
    two, widened to the largest rank's; counts all-reduced)."""
    hists = [h for name in pos for h in (pos[name], neg[name])]
    ranges = distributed.gather([(h.hi, h.max) for h in hists])
    for i, h in enumerate(hists):
        hi = max(r[i][0] for r in ranges)
        h.max = max(r[i][1] for r in ranges)
        if hi == 0.0:                   # no value on any rank (the input neuron's negative branch)
            continue
        if h.hi == 0.0:
            h.hi = hi
        h.widen(hi / 2)                 # hi is a power of two: widening to above hi/2 reaches it exactly
    counts = distributed.sum_(torch.stack([h.counts for h in hists]))
    for h, c in zip(hists, counts, strict=True):
        h.counts = c
        h.n = int(round(float(c.sum())))
    everyone = distributed.gather(modes)
    for name, m in modes.items():
        m.absorb([ranks[name] for ranks in everyone])


def site_histogram(node, polarity: int) -> StreamingHistogram:
    """A calibrated site's histogram of positive values (0) or of negative magnitudes (1), from what
    :func:`calibrate` stored on the node."""
    h = StreamingHistogram(int(node.params["hist_pos"].numel()))
    h.counts = node.params["hist_pos" if polarity == 0 else "hist_neg"].to(h.counts.dtype).clone()
    h.hi = float(node.attrs["hist_hi"][polarity])
    h.max = float(node.attrs["max_pos" if polarity == 0 else "max_neg"])
    h.n = int(round(float(h.counts.sum())))
    return h


def calibrate(graph: Graph, batches, percentile: float = 1.0, bins: int = 4096, quiet: bool = False) -> Graph:
    """Set θ⁺, θ⁻ of every dual site and o_max of every post-softmax site from ANN activations.

    ``batches`` yields input tensors. The histograms are kept on the nodes
    (``hist_pos``/``hist_neg`` params, ``hist_hi`` attrs) for reports, and so is every channel's most
    frequent input value with its share of positions (``mode_value``/``mode_share`` params), which
    :func:`sfn_deploy.passes.configure` reads.
    """
    if not 0 <= percentile < 100:
        raise ValueError(f"percentile p must lie in [0, 100), got {percentile}")
    sites = {n.name: n for n in graph.sites}
    pos = {k: StreamingHistogram(bins) for k in sites}
    neg = {k: StreamingHistogram(bins) for k in sites}
    modes = {k: RepeatedValues() for k in sites}

    for xb in progress(batches, "calibrating", quiet=quiet):
        run(graph, xb, spiking=False, hook=_SiteInputs(pos, neg, modes))
    if distributed.active():            # torchrun: each rank saw its share of the batches
        _sum_ranks(pos, neg, modes)
    for name, node in sites.items():
        a = node.attrs
        a["percentile"] = float(percentile)
        a["calib_samples"] = pos[name].n + neg[name].n
        a["max_pos"], a["max_neg"] = pos[name].max, neg[name].max
        if a["kind"] == "softmax":
            a["o_max"] = pos[name].max
        else:
            a["theta_pos"] = top_percent(pos[name], percentile)
            a["theta_neg"] = 0.0 if a.get("absorbs") else top_percent(neg[name], percentile)
        node.params["hist_pos"] = pos[name].counts.to(torch.float32)
        node.params["hist_neg"] = neg[name].counts.to(torch.float32)
        a["hist_hi"] = [pos[name].hi, neg[name].hi]
        node.params["mode_value"], node.params["mode_share"] = modes[name].result()
        configure(node, a["lam"])
    return graph
