"""A constant-time, exact SFN fire function: a table over the float32 bit pattern, one comparison.

``torch.bucketize`` (a binary search per element, one per polarity) dominated the SNN's run time.
Both polarities become one ascending list of float32 thresholds T with
``signed index = #{T ≤ x} − N⁻``: a positive boundary b fires at x ≥ b; a negative one fires at
−x ≥ b, i.e. x ≤ −b, i.e. *not* x ≥ nextafter(−b, +∞) — all float32 comparisons, so exact.
The top bits of x's float32 bit pattern split the number line into cells, each a contiguous range
of floats, with no rounding at all; the shift is chosen so that no cell holds two thresholds.
Per cell, ``base`` = #{T ≤ the cell's lowest float} and ``inner`` = the one threshold inside the
cell (NaN if none), so #{T ≤ x} = base + [x ≥ inner]. Each table is checked against bucketize at
every threshold, its float32 neighbours and every cell's ends when built; a site whose table
would need more than 2^20 cells, or fails the check, keeps bucketize.
"""
from __future__ import annotations

import numpy as np
import torch

MAX_BITS = 20          # at most 2^20 cells (8 MB of tables)


class FireGrid:
    def __init__(self, node):
        p = node.params
        bp = p["bounds_pos"].to(torch.float32).numpy()
        bn = p["bounds_neg"].to(torch.float32).numpy()
        self.n = p["table"].numel() - 1
        self.n_neg = len(bn)
        t = np.sort(np.concatenate([bp, np.nextafter(-bn, np.float32(np.inf)).astype(np.float32)]))
        self.ok = len(t) > 0 and bool(np.all(np.isfinite(t))) and bool(np.all(np.diff(t) > 0))
        if not self.ok:
            return
        bits = t.view(np.uint32).astype(np.int64)
        # the largest shift that keeps consecutive thresholds in different cells
        differ = [int(a ^ b).bit_length() - 1 for a, b in zip(bits[:-1], bits[1:])]
        shift = min(differ + [31])
        self.shift = max(shift, 32 - MAX_BITS)
        if shift < self.shift:
            self.ok = False
            return
        cells = 1 << (32 - self.shift)
        self.offset = 1 << (31 - self.shift)              # (int32 bits >> shift) + offset ∈ [0, cells)
        high = np.arange(cells, dtype=np.int64) - self.offset
        start = (high << self.shift).astype(np.int32).view(np.float32)
        end = ((high << self.shift) + (1 << self.shift) - 1).astype(np.int32).view(np.float32)
        with np.errstate(invalid="ignore"):               # the cells of NaN bit patterns (signalling ones too)
            low = np.where(high < 0, end, start)           # negative floats run backwards in int order
            top = np.where(high < 0, start, end)
            low = np.where(np.isnan(low) & np.isneginf(top), -np.inf, low).astype(np.float32)   # −inf with −NaNs
            base = np.searchsorted(t.astype(np.float64), low.astype(np.float64), side="right")
            inner_i = np.minimum(base, len(t) - 1)
            inside = (t[inner_i] > low) & (t[inner_i] <= top)
            inner = np.where(inside, t[inner_i], np.float32(np.nan)).astype(np.float32)
        # output-table position: signed index + n
        self.base = torch.from_numpy((base - self.n_neg + self.n).astype(np.int32))
        self.inner = torch.from_numpy(inner)
        self.ok = self._agrees(node, t, low, top)

    def position(self, x: torch.Tensor) -> torch.Tensor:
        """signed index + n (the row of the site's level table), int32, same shape as x."""
        flat = x.reshape(-1)
        c = (flat.view(torch.int32) >> self.shift).add_(self.offset)
        k = torch.index_select(self.base, 0, c)
        k += flat >= torch.index_select(self.inner, 0, c)
        return k.view(x.shape)

    def _agrees(self, node, t: np.ndarray, low: np.ndarray, top: np.ndarray) -> bool:
        from .runtime import spike_index
        ends = np.concatenate([low, top])
        ends = ends[np.isfinite(ends)]
        probes = np.concatenate([t, np.nextafter(t, np.float32(np.inf)), np.nextafter(t, np.float32(-np.inf)),
                                 ends, [0.0, -0.0, np.inf, -np.inf, 1e30, -1e30]]).astype(np.float32)
        x = torch.from_numpy(probes)
        return bool(torch.equal(self.position(x).to(torch.int64) - self.n, spike_index(node, x)))


def grid_for(node) -> FireGrid | None:
    """The node's table, rebuilt whenever its boundaries were replaced (``passes.configure``)."""
    bp, bn = node.params["bounds_pos"], node.params["bounds_neg"]
    cached = node.__dict__.get("_fire_grid")
    if cached is None or cached[0] is not bp or cached[1] is not bn:    # holds the tensors: ids stay unique
        cached = (bp, bn, FireGrid(node))
        node.__dict__["_fire_grid"] = cached
    grid = cached[2]
    return grid if grid.ok else None
