"""ONNX exporter: the converted SFN network as a standard ONNX model, and a runner for it.

The exported graph uses standard operators of the default domain only (no custom
ops), so any ONNX runtime executes it; onnxruntime (CPU) is the reference backend
(:class:`OnnxRunner`). Every IR op is lowered to the operators ``docs/onnx.md``
lists; an op or attribute combination without an exact standard form is refused
with a :class:`~sfn_deploy.errors.UserError` naming the node.

The Scale-and-Fire neuron in standard operators, O(1) per element: a monotone float32
map of x picks a cell of a small table holding at most one firing boundary, and one
comparison with that stored boundary decides (see :func:`fire_table`)::

    j = Clip<int32>(Cast<int32>(Clip(x·a + P, 0, C − 1)), 0, C − 1)   # cell; √ map for long tails
    k = 2·j + Cast<int32>(GreaterOrEqual(x, boundary[j]))             # GatherElements
    o = value[k]   (level[k]: the int64 spike level)                  # GatherElements

The boundaries are the node's stored float32 ``params`` and the tables are built and
verified at export by reproducing the map's float32 arithmetic, so the level is the count
``torch.bucketize(x, bounds, right=True)`` makes in the reference runtime (boundaries
≤ x; both branches, the negative one on −x) and the spike value is torch's float32
product ``level·λθ±``: both bit-identical. A site whose boundaries no such table can
separate (not produced by the three fire functions) falls back to comparing x with every
boundary (``_sfn_compare``, O(N) per element, equally exact).

Graph interface: input ``"input"`` (float32, ``["batch", *input_shape]``), output
``"logits"``; with ``levels=True`` one more output per SFN site, named after the
site node, holding its signed spike level as **int64** (the dtype of
``runtime.spike_levels``). ``ann=True`` exports the same graph with every neuron
replaced by the identity (or the ReLU it absorbed): the source ANN.
"""
from __future__ import annotations

import json
import os

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from ..errors import UnsupportedOpsError, UserError
from ..ir import Graph
from ..model_file import ConvertedModel, atomic_write
from ..samples import Rows

__all__ = ["to_onnx", "export_onnx", "OnnxRunner", "DEFAULT_OPSET", "MIN_OPSET", "MAX_OPSET"]

DEFAULT_OPSET = 17
MIN_OPSET = 17      # LayerNormalization appears in opset 17
MAX_OPSET = 21      # the newest opset the exporter is tested against (onnxruntime 1.23 runs up to 23)
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
LEVEL_DTYPE = "int64"
BATCH_DIM = "batch"

_F32 = np.float32


def _fmt_shape(shape) -> str:
    return "×".join(str(s) for s in shape) if len(shape) else "scalar"


# -- the neuron as a table lookup ----------------------------------------------------------------------
#
# x → cell j = clip(trunc(clip(φ(x) + P, 0, C − 1)), 0, C − 1) with φ a monotone map built from float32
# operations that are exact in IEEE arithmetic (Mul, Max/Min, Relu, Sqrt, Sub, Add, Clip, Cast), so the
# exporter computes every cell index exactly as a runtime does (FireTable.cells_of reproduces it).
# The scales are chosen so that at most one boundary can fall into a cell; that boundary (if any) is stored
# per cell, and level = x ≥ boundary[j] ? hi[j] : lo[j] — the comparison with the stored float32 boundary
# decides, so the result equals counting the boundaries ≤ x (torch.bucketize, right=True).

_SLACK = 2.0 ** -16        # a boundary claims every cell that x within this relative distance of it can reach
_MAX_CELLS = 1 << 16       # beyond this the export falls back to comparing with every boundary
_LINEAR_CELLS = 4096       # up to this many cells the plain linear map (the cheapest) is used
_COMPARE_MAX = 4096        # the comparison fallback is refused beyond this many boundaries (memory × N per element)


class FireTable:
    """The lookup form of one SFN site (see the comment above); ``fire_table`` builds and verifies it."""

    def __init__(self, mapping, scale_pos, scale_neg, offset, cells):
        self.mapping = mapping                      # "linear": u = x·a (a⁺ for x ≥ 0, a⁻ below)
        self.scale_pos, self.scale_neg = scale_pos, scale_neg   # "sqrt": u = √(x·a⁺)₊ − √(−x·a⁻)₊
        self.offset, self.cells = offset, cells     # float32 P, number of cells C
        self.boundary = self.value = self.level = None   # float32[C], float32[2C], int64[2C] (index 2j + fired)

    def phi(self, x: np.ndarray) -> np.ndarray:
        """u + P in float32, operation by operation as the exported graph computes it."""
        x = np.asarray(x, _F32)
        with np.errstate(all="ignore"):
            if self.mapping == "linear":
                sides = [x * s for s in self.linear_scales()]
                if len(sides) == 1:
                    u = sides[0]
                else:
                    u = (np.maximum if self.scale_pos >= self.scale_neg else np.minimum)(*sides)
            else:
                pos = np.sqrt(np.maximum(x * self.scale_pos, _F32(0))) if self.scale_pos is not None else None
                neg = np.sqrt(np.maximum(x * -self.scale_neg, _F32(0))) if self.scale_neg is not None else None
                if pos is None:
                    assert neg is not None              # a site has at least one branch
                    u = -neg
                else:
                    u = pos if neg is None else pos - neg
            return (u + self.offset).astype(_F32) if self.offset else u.astype(_F32)

    def linear_scales(self) -> list:
        """The distinct scales of the linear map: one (a shared scale, or one branch) or [a⁺, a⁻]."""
        s = [v for v in (self.scale_pos, self.scale_neg) if v is not None]
        return s[:1] if len(s) == 2 and s[0] == s[1] else s

    def cells_of(self, x: np.ndarray) -> np.ndarray:
        last = self.cells - 1
        with np.errstate(all="ignore"):
            j = np.clip(self.phi(x), _F32(0), _F32(last)).astype(np.int32)     # trunc; NaN → INT_MIN
        return np.clip(j, 0, last)

    def lookup(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(levels, values) for float32 x, exactly as the exported graph computes them."""
        x = np.asarray(x, _F32)
        j = self.cells_of(x)
        k = 2 * j + (x >= self.boundary[j])
        return self.level[k], self.value[k]


def reference_levels(x, bpos, bneg, table) -> np.ndarray:
    """torch.bucketize counting (right=True) in numpy: table[#{bpos ≤ x}] − table[#{bneg ≤ −x}]."""
    x = np.asarray(x, _F32)
    lv = table[np.searchsorted(bpos, x, side="right")]
    if bneg.size:
        lv = lv - table[np.searchsorted(bneg, -x, side="right")]
    return lv


def _spike_values(level, steps, dual) -> np.ndarray:
    lv = level.astype(_F32)                            # torch: level.to(float32)·step, one float32 product
    with np.errstate(all="ignore"):
        return np.where(level >= 0, lv * steps[0], lv * steps[1]).astype(_F32) if dual else \
            (lv * steps[0]).astype(_F32)


def _cell_scale(v: np.ndarray, root: bool) -> float:
    """Cells per unit: one per smallest gap between boundaries (in √ space for the sqrt mapping)."""
    v = np.sqrt(v) if root else v
    gaps = np.diff(v)
    gaps = gaps[gaps > 0]
    if gaps.size:
        return 1.0 / gaps.min()
    return 0.5 / v[0] if v.size and v[0] > 0 else 1.0


def fire_table(bpos, bneg, table, steps) -> FireTable | None:
    """The verified lookup form of a site, or None when no map keeps one boundary per cell in _MAX_CELLS."""
    bpos, bneg = np.asarray(bpos, _F32), np.asarray(bneg, _F32)
    table, steps = np.asarray(table, np.int64), np.asarray(steps, _F32)
    if not (bpos.size or bneg.size) or not (np.all(np.isfinite(bpos)) and np.all(np.isfinite(bneg))):
        return None
    # x crosses a boundary of the negative branch (b ≤ −x stops holding) at x ≥ nextup(−b)
    cuts = np.unique(np.concatenate([bpos, np.nextafter(-bneg, _F32(np.inf)).astype(_F32)]))
    pieces = reference_levels(np.concatenate([[_F32(-np.inf)], cuts]), bpos, bneg, table)   # level on [cut_k, cut_k+1)
    lo_x = np.minimum(cuts.astype(np.float64) * (1 - np.sign(cuts) * _SLACK) - 2.0 ** -140,
                      np.nextafter(cuts, _F32(-np.inf))).astype(_F32)
    hi_x = np.maximum(cuts.astype(np.float64) * (1 + np.sign(cuts) * _SLACK) + 2.0 ** -140, cuts).astype(_F32)
    pos, neg = cuts[cuts >= 0].astype(np.float64), np.sort(-cuts[cuts < 0].astype(np.float64))

    def candidate(mapping, mult):
        root = mapping == "sqrt"
        sp, sn = _cell_scale(pos, root) * mult, _cell_scale(neg, root) * mult
        if root:
            sp, sn = sp * sp, sn * sn
        elif mapping == "shared":                      # one Mul for both signs: the finer scale everywhere
            sp = sn = max(sp if bpos.size else 0.0, sn if bneg.size else 0.0)
            mapping = "linear"
        a_pos = _F32(sp) if bpos.size else None
        a_neg = _F32(sn) if bneg.size else None
        if a_pos is None and a_neg is None or not all(np.isfinite(a) and a > 0 for a in (a_pos, a_neg)
                                                      if a is not None):
            return None
        t = FireTable(mapping, a_pos, a_neg, _F32(0), 1)
        u = t.phi(cuts).astype(np.float64)
        if not np.all(np.isfinite(u)):
            return None
        lo, hi = int(np.floor(u.min())) - 1, int(np.floor(u.max())) + 1
        if u.min() >= 0:
            lo = 0                       # cell 0 holds everything below: no offset to add
        if hi - lo + 1 > _MAX_CELLS:
            return None
        t.offset, t.cells = _F32(-lo), hi - lo + 1
        return t

    def build(t):
        first, last = t.cells_of(lo_x), t.cells_of(hi_x)   # cells a boundary may share with x on either side
        if np.any(last[:-1] >= first[1:]):
            return False                                    # two boundaries could meet in one cell
        cells = np.arange(t.cells)
        below = np.searchsorted(last, cells, side="left")   # boundaries certainly ≤ every x of the cell
        owner = np.searchsorted(first, cells, side="right") - 1   # the boundary that may cut the cell
        cut = (owner >= 0) & (owner < cuts.size)
        cut &= np.where(cut, last[np.clip(owner, 0, cuts.size - 1)] >= cells, False)
        t.boundary = np.where(cut, cuts[np.clip(owner, 0, cuts.size - 1)], _F32(0)).astype(_F32)
        lo_lv = pieces[below]
        hi_lv = np.where(cut, pieces[np.clip(below + 1, 0, cuts.size)], lo_lv)
        t.level = np.stack([lo_lv, hi_lv], 1).reshape(-1).astype(np.int64)
        t.value = _spike_values(t.level, steps, bool(bneg.size))
        # check: every boundary, its neighbouring floats, the slack ends and the extremes
        probe = np.concatenate([cuts, np.nextafter(cuts, _F32(-np.inf)), np.nextafter(cuts, _F32(np.inf)),
                                lo_x, hi_x, _F32([0.0, -0.0, np.inf, -np.inf, 3e38, -3e38, 1e-30, -1e-30])])
        probe = probe.astype(_F32)
        lv, val = t.lookup(probe)
        ref = reference_levels(probe, bpos, bneg, table)
        want = _spike_values(ref, steps, bool(bneg.size))
        return bool(np.array_equal(lv, ref) and np.array_equal(val.view(np.int32), want.view(np.int32)))

    # cheapest map first (one Mul; a Mul per sign; √ compression for long exponential tails), finer scales
    # when a boundary pair shares a cell; linear maps beyond _LINEAR_CELLS cells only as the last resort
    tries = [(m, k) for m in ("shared", "linear", "sqrt") for k in (1, 1.5, 2, 4)]
    for small in (True, False):
        for mapping, mult in tries:
            t = candidate(mapping, mult)
            if t is None or (small and mapping != "sqrt" and t.cells > _LINEAR_CELLS) or \
                    (not small and mapping == "sqrt"):
                continue
            if build(t):
                return t
    return None


class _Lowering:
    """Walks the IR in order and appends ONNX nodes and initializers."""

    def __init__(self, model: ConvertedModel, levels: bool, opset: int, ann: bool):
        self.model, self.graph = model, model.graph
        self.levels, self.opset, self.ann = levels, opset, ann
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.used: set[str] = {INPUT_NAME, OUTPUT_NAME}
        self.val: dict[str, str] = {}            # IR node name -> ONNX tensor name of its value
        self.level_out: dict[str, str] = {}      # site name -> ONNX tensor name of its (int64) level
        self._consts: dict[tuple, str] = {}
        self._batch: dict[int, str] = {}
        self.problems: list[str] = []
        self.public = {OUTPUT_NAME} | ({s.name for s in self.graph.sites} if levels else set())
        self.used |= self.public
        self.current = ""

    # -- naming and emission -------------------------------------------------
    def fresh(self, base: str) -> str:
        name, k = base, 1
        while name in self.used:
            k += 1
            name = f"{base}_{k}"
        self.used.add(name)
        return name

    def emit(self, op_type: str, inputs: list[str], out: str | None = None, **attrs) -> str:
        out = out or self.fresh(f"{self.current}/{op_type}")
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=self.fresh(f"{self.current}:{op_type}"),
                                           **attrs))
        return out

    def init(self, array: np.ndarray, base: str) -> str:
        name = self.fresh(base)
        self.inits.append(numpy_helper.from_array(np.array(array, order="C"), name))   # keeps 0-d arrays 0-d
        return name

    def param(self, t: torch.Tensor, base: str) -> str:
        a = t.detach().cpu().numpy()
        if np.issubdtype(a.dtype, np.floating):
            a = a.astype(_F32)
        return self.init(a, f"{self.current}.{base}")

    def const(self, values, dtype=np.int64) -> str:
        """A small shared constant (shapes, axes, scalars)."""
        arr = np.asarray(values, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            self._consts[key] = self.init(arr, "const")
        return self._consts[key]

    def scalar(self, v: float) -> str:
        return self.const(np.float32(v), _F32)

    # -- the batch size at run time -------------------------------------------
    def batch(self, k: int = 1) -> str:
        """1-D int64 tensor [B·k], B read from the input's shape at run time."""
        if 1 not in self._batch:
            saved, self.current = self.current, "batch"
            self._batch[1] = self.emit("Shape", [INPUT_NAME], self.fresh("batch_size"), start=0, end=1)
            self.current = saved
        if k not in self._batch:
            self._batch[k] = self.emit("Mul", [self._batch[1], self.const([k])])
        return self._batch[k]

    def shape_tensor(self, shape: list) -> str:
        """A shape vector whose "B"/"B*k" entries are computed from the batch size at run time."""
        if not any(isinstance(s, str) for s in shape):
            return self.const([int(s) for s in shape])
        parts: list[str] = []
        run: list[int] = []
        for s in shape:
            if isinstance(s, str):
                if run:
                    parts.append(self.const(run))
                    run = []
                k = int(s.split("*")[1]) if "*" in s else 1
                parts.append(self.batch(k))
            else:
                run.append(int(s))
        if run:
            parts.append(self.const(run))
        return parts[0] if len(parts) == 1 else self.emit("Concat", parts, axis=0)

    def own_shape(self, n) -> list:
        """The node's shape with the batch entry restored as "B"."""
        sh: list = list(n.shape)
        if n.bdim is not None:
            sh[n.bdim] = "B"
        return sh

    # -- the walk ---------------------------------------------------------------
    def value_name(self, n) -> str:
        if n.op == "input":
            return INPUT_NAME
        base = n.name if n.name not in self.public else f"{n.name}:value"
        return self.fresh(base)

    def run(self) -> None:
        for n in self.graph.nodes:
            self.current = n.name
            try:
                out = self.lower(n)
            except _Unsupported as e:
                self.problems.append(f"node {n.name!r} ({n.op}{', ' + n.source if n.source else ''}): {e}")
                out = self.fresh(n.name)       # keep walking to report every problem at once
            self.val[n.name] = out
        if self.problems:
            raise UnsupportedOpsError(self.problems)
        self.current = "output"
        self.emit("Identity", [self.val[self.graph.output]], OUTPUT_NAME)

    def lower(self, n) -> str:
        a, p, op = n.attrs, n.params, n.op
        xs = [self.val[i] for i in n.inputs]
        if op == "input":
            return INPUT_NAME
        out = self.value_name(n)
        if op == "constant":
            if "value" not in p:
                raise _Unsupported("constant without a stored value")
            a_ = p["value"].detach().cpu().numpy()
            if np.issubdtype(a_.dtype, np.floating):
                a_ = a_.astype(_F32)
            self.inits.append(numpy_helper.from_array(np.array(a_, order="C"), out))
            return out
        if op == "sfn" or (op in ("if_neuron", "mbe_neuron") and self.ann):   # the ANN of any method: identity / ReLU
            return self.sfn(n, xs[0], out)
        fn = getattr(self, "op_" + op, None)
        if fn is None:
            raise _Unsupported("no ONNX lowering for this op")
        return fn(n, a, p, xs, out)

    # -- the neuron -------------------------------------------------------------
    def sfn(self, n, x: str, out: str) -> str:
        if self.ann:
            return self.emit("Relu" if n.attrs.get("absorbs") == "relu" else "Identity", [x], out)
        p = n.params
        for k in ("bounds_pos", "bounds_neg", "steps", "table"):
            if k not in p:
                raise _Unsupported(f"neuron has no {k!r}: configure the site (set λ) before exporting")
        table = p["table"].detach().cpu().to(torch.float64).numpy()
        inc = np.diff(table).astype(_F32)                      # y_i − y_{i−1}
        if np.any(table != np.round(table)) or np.abs(table).max(initial=0) >= 2 ** 22:
            raise _Unsupported("spike levels must be integers below 2^22 (sums exact in float32)")
        steps = p["steps"].detach().cpu().to(torch.float32).numpy()
        bpos = p["bounds_pos"].detach().cpu().to(torch.float32).numpy()
        bneg = p["bounds_neg"].detach().cpu().to(torch.float32).numpy()
        for b, what in ((bpos, "bounds_pos"), (bneg, "bounds_neg")):
            if b.size and b.size != inc.size:
                raise _Unsupported(f"{what} has {b.size} entries but the level table has {inc.size} levels")
        for b, what in ((bpos, "bounds_pos"), (bneg, "bounds_neg")):
            if np.any(np.diff(b) < 0) or np.any(np.isnan(b)):
                raise _Unsupported(f"{what} must be ascending (the reference runtime bucketizes them)")
        if not bpos.size and not bneg.size:            # both branches off: y_0 everywhere
            level = self.emit("ConstantOfShape", [self.emit("Shape", [x])],
                              value=numpy_helper.from_array(np.full(1, float(table[0]), _F32)))
            self.emit("Mul", [level, self.scalar(steps[0])], out)
            if self.levels:
                self.level_out[n.name] = self.emit("Cast", [level], n.name, to=TensorProto.INT64)
            return out
        lut = fire_table(bpos, bneg, p["table"].detach().cpu().numpy().astype(np.int64), steps)
        if lut is not None:
            return self._sfn_lookup(n, x, out, lut)
        if bpos.size + bneg.size > _COMPARE_MAX:
            raise _Unsupported(f"{bpos.size + bneg.size:,} firing boundaries have no constant-time lookup, and "
                               f"comparing every element with each would take {bpos.size + bneg.size:,}× its "
                               "memory: convert with fewer --levels")
        return self._sfn_compare(n, x, out, table, inc, steps, bpos, bneg)

    def _sfn_lookup(self, n, x: str, out: str, lut: FireTable) -> str:
        """O(1) per element: cell index from a monotone map of x, one comparison with the cell's boundary."""
        xf = self.emit("Reshape", [x, self.const([-1])])
        sides = []
        if lut.mapping == "linear":
            sides = [self.emit("Mul", [xf, self.scalar(s)]) for s in lut.linear_scales()]
            u = sides[0] if len(sides) == 1 else \
                self.emit("Max" if lut.scale_pos >= lut.scale_neg else "Min", sides)
        else:                                          # sqrt: √(x·a⁺)₊ − √(−x·a⁻)₊
            if lut.scale_pos is not None:
                sides.append(self.emit("Sqrt", [self.emit("Relu", [self.emit("Mul", [xf, self.scalar(
                    lut.scale_pos)])])]))
            if lut.scale_neg is not None:
                sides.append(self.emit("Sqrt", [self.emit("Relu", [self.emit("Mul", [xf, self.scalar(
                    -lut.scale_neg)])])]))
            if lut.scale_pos is None:
                u = self.emit("Neg", sides)
            else:
                u = sides[0] if len(sides) == 1 else self.emit("Sub", sides)
        if lut.offset:
            u = self.emit("Add", [u, self.scalar(lut.offset)])
        last = lut.cells - 1
        cell = self.emit("Clip", [u, self.scalar(0.0), self.scalar(last)])
        cell = self.emit("Cast", [cell], to=TensorProto.INT32)                          # truncation: u ≥ 0
        cell = self.emit("Clip", [cell, self.const(0, np.int32), self.const(last, np.int32)])   # NaN → 0
        thr = self.emit("GatherElements", [self.init(lut.boundary, f"{n.name}.cell_boundary"), cell], axis=0)
        fired = self.emit("Cast", [self.emit("GreaterOrEqual", [xf, thr])], to=TensorProto.INT32)
        index = self.emit("Add", [self.emit("Add", [cell, cell]), fired])             # 2·cell + fired
        shape = self.emit("Shape", [x])
        value = self.emit("GatherElements", [self.init(lut.value, f"{n.name}.cell_value"), index], axis=0)
        self.emit("Reshape", [value, shape], out)
        if self.levels:
            lv = self.emit("GatherElements", [self.init(lut.level, f"{n.name}.cell_level"), index], axis=0)
            self.level_out[n.name] = self.emit("Reshape", [lv, shape], n.name)
        return out

    def _sfn_compare(self, n, x, out, table, inc, steps, bpos, bneg) -> str:
        """Fallback, O(N) per element: compare with every boundary, sum the increments of those passed."""
        # Counting boundaries ≤ x (torch.bucketize, right=True) is Σ_i [x ≥ b_i]; with increments
        # inc_i = y_i − y_{i−1} the weighted count is the level: Σ_{i≤k} inc_i = y_k − y_0.
        # The negative branch counts b ≤ −x, i.e. N − #{x > −b}; for float32, x > c ⟺ x ≥ nextup(c),
        # so both branches become one GreaterOrEqual against one vector and one MatMul:
        #   level = y_0 + Σ inc·[x ≥ bpos] − (y_N − y_0) + Σ inc·[x ≥ nextup(−bneg)]
        # Every partial sum is an integer below 2^24, so the float32 sums are exact in any order.
        y0, yn = float(table[0]), float(table[-1])
        thresholds, weights, offset = [], [], y0
        if bpos.size:
            thresholds.append(bpos)
            weights.append(inc)
        if bneg.size:
            thresholds.append(np.nextafter(-bneg, np.float32(np.inf)).astype(_F32))
            weights.append(inc)
            offset -= yn - y0
        ux = self.emit("Unsqueeze", [x, self.const([-1])])
        fired = self.emit("GreaterOrEqual", [ux, self.init(np.concatenate(thresholds), f"{n.name}.thresholds")])
        fired = self.emit("Cast", [fired], to=TensorProto.FLOAT)
        w = np.concatenate(weights).reshape(-1, 1).astype(_F32)   # 2-D: onnxruntime's fast GEMM path
        level = self.emit("MatMul", [fired, self.init(w, f"{n.name}.increments")])
        level = self.emit("Squeeze", [level, self.const([-1])])
        if offset:
            level = self.emit("Add", [level, self.scalar(offset)])
        if bneg.size:     # torch: where(level ≥ 0, level·λθ⁺, level·λθ⁻): the same single product
            step = self.emit("Where", [self.emit("GreaterOrEqual", [level, self.scalar(0.0)]),
                                       self.scalar(steps[0]), self.scalar(steps[1])])
            self.emit("Mul", [level, step], out)
        else:
            self.emit("Mul", [level, self.scalar(steps[0])], out)
        if self.levels:
            self.level_out[n.name] = self.emit("Cast", [level], n.name, to=TensorProto.INT64)
        return out

    # -- weight layers and products ---------------------------------------------
    def op_conv2d(self, n, a, p, xs, out):
        w = p["weight"]
        if w.dim() != 4:
            raise _Unsupported(f"weight of shape {list(w.shape)} is not a 2-D convolution kernel")
        for key in ("stride", "padding", "dilation"):
            if not (isinstance(a[key], (list, tuple)) and len(a[key]) == 2
                    and all(isinstance(v, int) for v in a[key])):
                raise _Unsupported(f"{key}={a[key]!r}: only two integers are supported")
        b = self.bias(p)
        ins = [xs[0], self.param(w, "weight")] + ([self.param(b, "bias")] if b is not None else [])
        ph, pw = a["padding"]
        return self.emit("Conv", ins, out, kernel_shape=list(w.shape[2:]), strides=list(a["stride"]),
                         pads=[ph, pw, ph, pw], dilations=list(a["dilation"]), group=int(a["groups"]))

    def bias(self, p: dict):
        """A weight layer's bias: the SNN's, or in the ANN export the source model's (``bias_ann``: bias
        correction gave the SNN another)."""
        return p["bias_ann"] if self.ann and "bias_ann" in p else p.get("bias")

    def op_linear(self, n, a, p, xs, out):
        w, b = p["weight"], self.bias(p)
        if w.dim() != 2:
            raise _Unsupported(f"weight of shape {list(w.shape)} is not a matrix")
        if len(n.shape) == 2:      # torch runs a 2-D linear as one addmm: so does Gemm
            ins = [xs[0], self.param(w, "weight")] + ([self.param(b, "bias")] if b is not None else [])
            return self.emit("Gemm", ins, out, transB=1)
        wt = self.param(w.t().contiguous(), "weight_t")
        if b is None:
            return self.emit("MatMul", [xs[0], wt], out)
        return self.emit("Add", [self.emit("MatMul", [xs[0], wt]), self.param(b, "bias")], out)

    def op_matmul(self, n, a, p, xs, out):
        return self.emit("MatMul", xs[:2], out)

    # -- host operations ----------------------------------------------------------
    def op_relu(self, n, a, p, xs, out):
        return self.emit("Relu", [xs[0]], out)

    def op_gelu(self, n, a, p, xs, out):
        x = xs[0]
        approx = a.get("approximate", "none")
        if approx not in ("none", "tanh"):
            raise _Unsupported(f"approximate={approx!r}")
        if self.opset >= 20:
            return self.emit("Gelu", [x], out, approximate=approx)
        if approx == "none":       # x·½·(1 + erf(x/√2)), in torch's order
            t = self.emit("Erf", [self.emit("Mul", [x, self.scalar(np.sqrt(0.5))])])
        else:                      # x·½·(1 + tanh(√(2/π)·(x + 0.044715·x³)))
            cube = self.emit("Mul", [self.emit("Mul", [x, x]), x])
            inner = self.emit("Add", [x, self.emit("Mul", [cube, self.scalar(0.044715)])])
            t = self.emit("Tanh", [self.emit("Mul", [inner, self.scalar(np.sqrt(2.0 / np.pi))])])
        half = self.emit("Mul", [x, self.scalar(0.5)])
        return self.emit("Mul", [half, self.emit("Add", [t, self.scalar(1.0)])], out)

    def op_softmax(self, n, a, p, xs, out):
        return self.emit("Softmax", [xs[0]], out, axis=int(a["dim"]))

    def op_log_softmax(self, n, a, p, xs, out):
        return self.emit("LogSoftmax", [xs[0]], out, axis=int(a["dim"]))

    def op_layer_norm(self, n, a, p, xs, out):
        k = len(a["normalized_shape"])
        if list(n.shape[len(n.shape) - k:]) != list(a["normalized_shape"]):
            raise _Unsupported(f"normalized_shape {a['normalized_shape']} is not the trailing shape {n.shape}")
        w = p.get("weight")
        scale = self.param(w, "weight") if w is not None else \
            self.init(np.ones(a["normalized_shape"], _F32), f"{n.name}.ones")
        ins = [xs[0], scale] + ([self.param(p["bias"], "bias")] if p.get("bias") is not None else [])
        return self.emit("LayerNormalization", ins, out, axis=-k, epsilon=float(a["eps"]))

    def op_batch_norm(self, n, a, p, xs, out):
        mean, var = p["running_mean"], p["running_var"]
        c = mean.numel()
        w = self.param(p["weight"], "weight") if p.get("weight") is not None else \
            self.init(np.ones(c, _F32), f"{n.name}.ones")
        b = self.param(p["bias"], "bias") if p.get("bias") is not None else \
            self.init(np.zeros(c, _F32), f"{n.name}.zeros")
        return self.emit("BatchNormalization", [xs[0], w, b, self.param(mean, "running_mean"),
                                                self.param(var, "running_var")], out, epsilon=float(a["eps"]))

    def _binary(self, onnx_op, n, a, xs, out, alpha_ok):
        alpha = a.get("alpha", 1)
        if alpha != 1 and not alpha_ok:
            raise _Unsupported(f"alpha={alpha}")
        if len(xs) > 1:
            other = xs[1] if alpha == 1 else self.emit("Mul", [xs[1], self.scalar(alpha)])
        elif "other" in a:
            other = self.scalar(alpha * a["other"])    # torch: float32(alpha·other), one rounding
        else:
            raise _Unsupported("second operand missing")
        return self.emit(onnx_op, [xs[0], other], out)

    def op_add(self, n, a, p, xs, out):
        return self._binary("Add", n, a, xs, out, True)

    def op_sub(self, n, a, p, xs, out):
        return self._binary("Sub", n, a, xs, out, True)

    def op_mul(self, n, a, p, xs, out):
        return self._binary("Mul", n, a, xs, out, False)

    def op_div(self, n, a, p, xs, out):
        if a.get("rounding_mode") not in (None, "none"):
            raise _Unsupported(f"rounding_mode={a['rounding_mode']!r}")
        return self._binary("Div", n, a, xs, out, False)

    # -- pooling ------------------------------------------------------------------
    def _pool_geometry(self, n, a):
        src = self.graph[n.inputs[0]]
        if len(src.shape) != 4 or src.bdim != 0:
            raise _Unsupported(f"2-D pooling expects an N×C×H×W input, got {_fmt_shape(src.shape)}")
        k, s, pad = list(a["kernel_size"]), list(a["stride"] or a["kernel_size"]), list(a["padding"])
        d = list(a.get("dilation", [1, 1]))
        floor_o, ceil_o, naive_ceil = [], [], []
        for i in range(2):
            size, eff = src.shape[2 + i], d[i] * (k[i] - 1) + 1
            num = size + 2 * pad[i] - eff
            floor_o.append(num // s[i] + 1)
            c = -(-num // s[i]) + 1
            naive_ceil.append(c)
            if (c - 1) * s[i] >= size + pad[i]:      # torch: the last window must start inside
                c -= 1
            ceil_o.append(c)
        want = ceil_o if a.get("ceil_mode") else floor_o
        if list(n.shape[2:]) != want:
            raise _Unsupported(f"pooled shape {_fmt_shape(n.shape[1:])} does not follow from the attributes")
        overhang = bool(a.get("ceil_mode")) and ceil_o != floor_o
        if overhang and ceil_o != naive_ceil:
            raise _Unsupported("ceil_mode windows that start in the padding (torch drops them, ONNX does not)")
        return dict(kernel_shape=k, strides=s, pads=[pad[0], pad[1], pad[0], pad[1]]), overhang

    def op_max_pool2d(self, n, a, p, xs, out):
        geo, overhang = self._pool_geometry(n, a)
        return self.emit("MaxPool", [xs[0]], out, dilations=list(a.get("dilation", [1, 1])),
                         ceil_mode=int(overhang), **geo)

    def op_avg_pool2d(self, n, a, p, xs, out):
        if a.get("divisor_override") is not None:
            raise _Unsupported(f"divisor_override={a['divisor_override']} has no ONNX AveragePool equivalent")
        geo, overhang = self._pool_geometry(n, a)
        include = bool(a.get("count_include_pad", True))
        if overhang and include:
            if any(geo["pads"]):   # torch counts the padding but not the overhang: no ONNX attribute says that
                raise _Unsupported("ceil_mode with padding and count_include_pad=True")
            include = False        # without padding torch divides overhanging windows by their valid size
        return self.emit("AveragePool", [xs[0]], out, count_include_pad=int(include), ceil_mode=int(overhang),
                         **geo)

    def op_upsample_nearest(self, n, a, p, xs, out):     # copies: two Gathers with the capture's indices
        rows = self.emit("Gather", [xs[0], self.const([int(v) for v in a["rows"]])], axis=2)
        return self.emit("Gather", [rows, self.const([int(v) for v in a["cols"]])], out, axis=3)

    def op_upsample_bilinear(self, n, a, p, xs, out):   # Resize in torch's coordinate convention
        mode = "align_corners" if a["align_corners"] else "pytorch_half_pixel"
        if a["scales"]:
            ins = [xs[0], "", self.const([1.0, 1.0, *a["scales"]], _F32)]
        else:
            ins = [xs[0], "", "", self.emit("Concat", [self.emit("Slice", [self.emit("Shape", [xs[0]]),
                                                                        self.const([0]), self.const([2])]),
                                                      self.const([int(v) for v in a["size"]])], axis=0)]
        return self.emit("Resize", ins, out, mode="linear", coordinate_transformation_mode=mode)

    def op_adaptive_avg_pool2d(self, n, a, p, xs, out):
        src = self.graph[n.inputs[0]]
        if len(src.shape) != 4 or src.bdim != 0:
            raise _Unsupported(f"adaptive pooling expects an N×C×H×W input, got {_fmt_shape(src.shape)}")
        (h, w), (oh, ow) = src.shape[2:], a["output_size"]
        if [oh, ow] == [1, 1]:
            return self.emit("GlobalAveragePool", [xs[0]], out)
        if h % oh == 0 and w % ow == 0:
            k = [h // oh, w // ow]
            return self.emit("AveragePool", [xs[0]], out, kernel_shape=k, strides=k)
        # windows of different sizes (or repeated pixels, 1×1 → 7×7): each output is the sum of its window
        # (a 0/1 matrix over the H·W pixels) divided by the window's size, as torch computes it
        ones, counts = _adaptive_windows(h, w, oh, ow)
        flat = self.emit("Reshape", [xs[0], self.shape_tensor(["B", src.shape[1], h * w])])
        summed = self.emit("MatMul", [flat, self.init(ones, f"{n.name}.windows")])
        mean = self.emit("Div", [summed, self.init(counts, f"{n.name}.window_sizes")])
        return self.emit("Reshape", [mean, self.shape_tensor(["B", src.shape[1], oh, ow])], out)

    def op_mean(self, n, a, p, xs, out):
        dims, keep = [int(d) for d in a["dims"]], int(bool(a["keepdim"]))
        if self.opset >= 18:
            return self.emit("ReduceMean", [xs[0], self.const(dims)], out, keepdims=keep)
        return self.emit("ReduceMean", [xs[0]], out, axes=dims, keepdims=keep)

    # -- layout -------------------------------------------------------------------
    def op_reshape(self, n, a, p, xs, out):
        shape = list(a["shape"])
        extra = {"allowzero": 1} if 0 in shape and -1 not in shape else {}
        return self.emit("Reshape", [xs[0], self.shape_tensor(shape)], out, **extra)

    def op_expand(self, n, a, p, xs, out):
        # torch's -1 keeps the input's size: ONNX Expand broadcasts, so 1 does the same
        shape = [1 if s == -1 else s for s in a["shape"]]
        return self.emit("Expand", [xs[0], self.shape_tensor(shape)], out)

    def op_permute(self, n, a, p, xs, out):
        return self.emit("Transpose", [xs[0]], out, perm=[int(d) for d in a["dims"]])

    def op_transpose(self, n, a, p, xs, out):
        perm = list(range(len(n.shape)))
        d0, d1 = int(a["dim0"]), int(a["dim1"])
        perm[d0], perm[d1] = perm[d1], perm[d0]
        return self.emit("Transpose", [xs[0]], out, perm=perm)

    def op_flatten(self, n, a, p, xs, out):
        src = self.graph[n.inputs[0]]
        s, e = int(a["start"]), int(a["end"])
        if s == e:
            return self.emit("Identity", [xs[0]], out)
        if s == 1 and e == len(src.shape) - 1 and src.bdim == 0:
            return self.emit("Flatten", [xs[0]], out, axis=1)
        return self.emit("Reshape", [xs[0], self.shape_tensor(self.own_shape(n))], out)

    def op_unsqueeze(self, n, a, p, xs, out):
        return self.emit("Unsqueeze", [xs[0], self.const([int(a["dim"])])], out)

    def op_squeeze(self, n, a, p, xs, out):
        dims = [int(d) for d in a["dims"]]
        if not dims:
            return self.emit("Identity", [xs[0]], out)
        return self.emit("Squeeze", [xs[0], self.const(dims)], out)

    def op_select(self, n, a, p, xs, out):
        return self.emit("Gather", [xs[0], self.const(int(a["index"]))], out, axis=int(a["dim"]))

    def op_slice(self, n, a, p, xs, out):
        c = self.const
        return self.emit("Slice", [xs[0], c([int(a["start"])]), c([int(a["end"])]), c([int(a["dim"])]),
                                   c([int(a["step"])])], out)

    def op_cat(self, n, a, p, xs, out):
        parts = []
        for name, x in zip(n.inputs, xs, strict=True):
            if self.graph[name].bdim is None and n.bdim is not None:   # a stored tensor: broadcast over B
                sh: list = [1] * len(n.shape)
                sh[n.bdim] = "B"
                x = self.emit("Expand", [x, self.shape_tensor(sh)])
            parts.append(x)
        return self.emit("Concat", parts, out, axis=int(a["dim"]))


    # -- the model zoo's operators (each in torch's own order of operations) --------
    def op_hardtanh(self, n, a, p, xs, out):
        return self.emit("Clip", [xs[0], self.scalar(a["min_val"]), self.scalar(a["max_val"])], out)

    def _relu6_of_x_plus_3(self, x):
        return self.emit("Clip", [self.emit("Add", [x, self.scalar(3.0)]), self.scalar(0.0), self.scalar(6.0)])

    def op_hardswish(self, n, a, p, xs, out):       # torch: x · min(max(x + 3, 0), 6) / 6
        return self.emit("Div", [self.emit("Mul", [xs[0], self._relu6_of_x_plus_3(xs[0])]), self.scalar(6.0)], out)

    def op_hardsigmoid(self, n, a, p, xs, out):     # torch: min(max(x + 3, 0), 6) / 6
        return self.emit("Div", [self._relu6_of_x_plus_3(xs[0]), self.scalar(6.0)], out)

    def op_silu(self, n, a, p, xs, out):            # torch: x / (1 + exp(−x))
        e = self.emit("Exp", [self.emit("Neg", [xs[0]])])
        return self.emit("Div", [xs[0], self.emit("Add", [e, self.scalar(1.0)])], out)

    def op_elu(self, n, a, p, xs, out):             # torch: scale·x, or scale·alpha·(exp(input_scale·x) − 1)
        x = xs[0]
        z = self.emit("Mul", [x, self.scalar(a["input_scale"])]) if a["input_scale"] != 1.0 else x
        neg = self.emit("Mul", [self.emit("Sub", [self.emit("Exp", [z]), self.scalar(1.0)]),
                                self.scalar(a["alpha"])])
        pos = x
        if a["scale"] != 1.0:
            neg, pos = (self.emit("Mul", [v, self.scalar(a["scale"])]) for v in (neg, pos))
        return self.emit("Where", [self.emit("Greater", [x, self.scalar(0.0)]), pos, neg], out)

    def op_threshold(self, n, a, p, xs, out):       # torch: x where x > threshold, else value
        keep = self.emit("Greater", [xs[0], self.scalar(a["threshold"])])
        return self.emit("Where", [keep, xs[0], self.scalar(a["value"])], out)

    def op_prelu(self, n, a, p, xs, out):           # the slopes along axis 1
        w = p["weight"].reshape([-1] + [1] * (len(n.shape) - 2)) if len(n.shape) > 2 else p["weight"]
        return self.emit("PRelu", [xs[0], self.param(w, "weight")], out)

    def op_softplus(self, n, a, p, xs, out):        # torch: x where beta·x > threshold, else log1p(exp(beta·x))/beta
        x, beta = xs[0], a["beta"]
        bx = self.emit("Mul", [x, self.scalar(beta)]) if beta != 1.0 else x
        soft = self.emit("Softplus", [bx])
        if beta != 1.0:
            soft = self.emit("Div", [soft, self.scalar(beta)])
        return self.emit("Where", [self.emit("Greater", [bx, self.scalar(a["threshold"])]), x, soft], out)

    def op_pow(self, n, a, p, xs, out):
        if a["exponent"] == 2.0:                    # torch squares exactly (x·x): so does Mul
            return self.emit("Mul", [xs[0], xs[0]], out)
        return self.emit("Pow", [xs[0], self.scalar(a["exponent"])], out)

    def op_amax(self, n, a, p, xs, out):
        return self._reduce("ReduceMax", a["dims"], a["keepdim"], xs[0], out)

    def op_sqrt(self, n, a, p, xs, out):
        return self.emit("Sqrt", [xs[0]], out)

    def op_rsqrt(self, n, a, p, xs, out):
        return self.emit("Reciprocal", [self.emit("Sqrt", [xs[0]])], out)

    def op_abs(self, n, a, p, xs, out):
        return self.emit("Abs", [xs[0]], out)

    def op_leaky_relu(self, n, a, p, xs, out):
        return self.emit("LeakyRelu", [xs[0]], out, alpha=float(a["negative_slope"]))

    def op_sign(self, n, a, p, xs, out):
        return self.emit("Sign", [xs[0]], out)

    def op_sigmoid(self, n, a, p, xs, out):
        return self.emit("Sigmoid", [xs[0]], out)

    def op_tanh(self, n, a, p, xs, out):
        return self.emit("Tanh", [xs[0]], out)

    def op_mish(self, n, a, p, xs, out):
        if self.opset >= 18:
            return self.emit("Mish", [xs[0]], out)
        return self.emit("Mul", [xs[0], self.emit("Tanh", [self.emit("Softplus", [xs[0]])])], out)

    def _reduce(self, onnx_op, dims, keep, x, out):
        if onnx_op == "ReduceSum" or self.opset >= 18:      # axes as an input (ReduceSum: from opset 13)
            return self.emit(onnx_op, [x, self.const([int(d) for d in dims])], out, keepdims=int(keep))
        return self.emit(onnx_op, [x], out, axes=[int(d) for d in dims], keepdims=int(keep))

    def op_sum(self, n, a, p, xs, out):
        return self._reduce("ReduceSum", a["dims"], a["keepdim"], xs[0], out)

    def op_vector_norm(self, n, a, p, xs, out):
        op = {1.0: "ReduceL1", 2.0: "ReduceL2"}.get(float(a["ord"]))
        if op is None:
            raise _Unsupported(f"vector norm of order {a['ord']}")
        return self._reduce(op, a["dims"], a["keepdim"], xs[0], out)

    def op_group_norm(self, n, a, p, xs, out):
        """(x − mean) / √(var + eps) per sample and group, then the per-channel affine map."""
        src = self.graph[n.inputs[0]]
        if src.bdim != 0 or len(src.shape) < 2:
            raise _Unsupported(f"GroupNorm expects an N×C×… input, got {_fmt_shape(src.shape)}")
        c, g = src.shape[1], int(a["num_groups"])
        grouped = self.emit("Reshape", [xs[0], self.shape_tensor(["B", g, -1])])
        mean = self.emit("ReduceMean", [grouped, self.const([2])], keepdims=1) if self.opset >= 18 else \
            self.emit("ReduceMean", [grouped], axes=[2], keepdims=1)
        d = self.emit("Sub", [grouped, mean])
        var = self.emit("ReduceMean", [self.emit("Mul", [d, d]), self.const([2])], keepdims=1) \
            if self.opset >= 18 else self.emit("ReduceMean", [self.emit("Mul", [d, d])], axes=[2], keepdims=1)
        y = self.emit("Div", [d, self.emit("Sqrt", [self.emit("Add", [var, self.scalar(a["eps"])])])])
        y = self.emit("Reshape", [y, self.shape_tensor(["B"] + list(src.shape[1:]))])
        trail = [1] * (len(src.shape) - 2)
        if p.get("weight") is not None:
            y = self.emit("Mul", [y, self.param(p["weight"].reshape(c, *trail), "weight")])
        if p.get("bias") is not None:
            y = self.emit("Add", [y, self.param(p["bias"].reshape(c, *trail), "bias")])
        return self.emit("Identity", [y], out)

    def op_pad(self, n, a, p, xs, out):
        widths, rank = [int(v) for v in a["pad"]], len(n.shape)
        begin, end = [0] * rank, [0] * rank
        for i in range(0, len(widths), 2):          # torch: (last axis begin, end, next-to-last ...)
            begin[rank - 1 - i // 2], end[rank - 1 - i // 2] = widths[i], widths[i + 1]
        mode = a.get("mode", "constant")
        if mode == "constant":
            return self.emit("Pad", [xs[0], self.const(begin + end), self.scalar(a.get("value", 0.0))], out,
                             mode="constant")
        if mode == "circular" and self.opset < 19:
            raise UserError(f"ONNX export: {n.name}: circular padding needs opset 19 or later (Pad mode=wrap)")
        return self.emit("Pad", [xs[0], self.const(begin + end)], out,
                         mode={"reflect": "reflect", "replicate": "edge", "circular": "wrap"}[mode])

    def op_roll(self, n, a, p, xs, out):
        x = xs[0]
        for shift, dim in zip(a["shifts"], a["dims"], strict=True):
            size = n.shape[int(dim)]
            k = int(shift) % size
            if k:
                c = self.const
                tail = self.emit("Slice", [x, c([size - k]), c([size]), c([int(dim)])])
                head = self.emit("Slice", [x, c([0]), c([size - k]), c([int(dim)])])
                x = self.emit("Concat", [tail, head], axis=int(dim))
        return self.emit("Identity", [x], out)


class _Unsupported(Exception):
    pass


def _adaptive_windows(h: int, w: int, oh: int, ow: int) -> tuple[np.ndarray, np.ndarray]:
    """torch's adaptive pooling windows [floor(i·H/OH), ceil((i+1)·H/OH)) as a (H·W)×(OH·OW) 0/1 matrix,
    and each window's pixel count."""
    ones = np.zeros((h * w, oh * ow), _F32)
    for i in range(oh):
        r0, r1 = (i * h) // oh, -(-((i + 1) * h) // oh)
        for j in range(ow):
            c0, c1 = (j * w) // ow, -(-((j + 1) * w) // ow)
            for r in range(r0, r1):
                ones[r * w + c0:r * w + c1, i * ow + j] = 1.0
    return ones, ones.sum(0).astype(_F32)


def _check_args(model, levels: bool, opset: int, ann: bool) -> ConvertedModel:
    if isinstance(model, Graph):
        model = ConvertedModel(model, list(model.input.shape[1:]))
    if not isinstance(model, ConvertedModel):
        raise UserError(f"export_onnx needs a converted model, got {type(model).__name__}")
    if not isinstance(opset, int) or not MIN_OPSET <= opset <= MAX_OPSET:
        raise UserError(f"ONNX opset {opset} is not supported; choose {MIN_OPSET}..{MAX_OPSET} "
                        f"(default {DEFAULT_OPSET}: the first with LayerNormalization)")
    if levels and ann:
        raise UserError("levels=True needs the spiking network; the ANN export (ann=True) has no spike levels")
    graph_shape = list(model.graph.input.shape[1:])
    if list(model.input_shape) != graph_shape:
        raise UserError(f"the model's input_shape {_fmt_shape(model.input_shape)} differs from its graph's input "
                        f"{_fmt_shape(graph_shape)}: damaged converted model")
    if levels:
        clash = [s.name for s in model.graph.sites if s.name in (INPUT_NAME, OUTPUT_NAME)]
        if clash:
            raise UserError(f"SFN site {clash[0]!r} has the name of a graph input/output; its level output "
                            "cannot be named after it")
    return model


def to_onnx(model: ConvertedModel, levels: bool = False, opset: int = DEFAULT_OPSET, ann: bool = False
            ) -> onnx.ModelProto:
    """Build the ONNX model of a converted network (no I/O). See the module docstring for the interface."""
    model = _check_args(model, levels, opset, ann)
    if not ann:                 # a multi-timestep baseline (--method if/ecmt) has no single-step form
        from ..methods import require_single_step
        require_single_step(model, "ONNX")
    g = model.graph
    low = _Lowering(model, levels, opset, ann)
    low.run()

    def info(name, shape, bdim, elem):
        dims: list = list(shape)
        if bdim is not None:
            dims[bdim] = BATCH_DIM
        return helper.make_tensor_value_info(name, elem, dims)

    inputs = [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, [BATCH_DIM, *model.input_shape])]
    out_node = g[g.output]
    outputs = [info(OUTPUT_NAME, out_node.shape, out_node.bdim, TensorProto.FLOAT)]
    for site in g.sites:
        if site.name in low.level_out:
            outputs.append(info(site.name, site.shape, site.bdim, TensorProto.INT64))
    graph = helper.make_graph(low.nodes, "sfn_" + ("ann" if ann else "snn"), inputs, outputs, low.inits)
    opsets = [helper.make_opsetid("", opset)]
    proto = helper.make_model(graph, opset_imports=opsets, producer_name="sfn-deploy",
                              producer_version=_version(), doc_string=(
                                  "Single-timestep Scale-and-Fire network exported by sfn-deploy"
                                  if not ann else "The source ANN of an sfn-deploy network (neurons as identity)"))
    proto.ir_version = helper.find_min_ir_version_for(opsets)     # the oldest runtimes that know this opset
    meta = {"sfn_deploy.mode": "ann" if ann else "snn",
            "sfn_deploy.input_shape": json.dumps(list(model.input_shape)),
            "sfn_deploy.sites": json.dumps([{"name": s.name, "role": s.attrs.get("role"),
                                             "steps": [float(v) for v in s.params["steps"]]
                                             if "steps" in s.params else None} for s in g.sites]),
            "sfn_deploy.level_outputs": json.dumps(list(low.level_out)),
            "sfn_deploy.level_dtype": LEVEL_DTYPE,
            "sfn_deploy.source": json.dumps(model.source, default=str),
            # how images become the input (docs/data.md): resize, crop, channels, mean/std; null: not recorded
            "sfn_deploy.preprocessing": json.dumps(None if model.preprocessing is None
                                                   else model.preprocessing.to_dict()),
            "sfn_deploy.classes": json.dumps(model.classes),
            # a model that returned several tensors: the output is their per-sample flattened concatenation
            "sfn_deploy.output_parts": json.dumps(g.output_parts)}
    helper.set_model_props(proto, meta)
    return proto


def export_onnx(model: ConvertedModel, path: str, *, levels: bool = False, opset: int = DEFAULT_OPSET,
                ann: bool = False) -> dict:
    """Write the network as an ONNX file (atomically: temporary name, then rename) and summarise it."""
    model = _check_args(model, levels, opset, ann)
    proto = to_onnx(model, levels=levels, opset=opset, ann=ann)
    if proto.ByteSize() >= 2 ** 31 - 1:
        raise UserError(f"{path}: the model is {proto.ByteSize() / 2 ** 30:.1f} GiB, over protobuf's 2 GiB limit "
                        "for one ONNX file")
    atomic_write(path, lambda tmp: onnx.save(proto, tmp))
    return {"path": path, "opset": opset, "nodes": len(proto.graph.node), "bytes": os.path.getsize(path),
            "outputs": [o.name for o in proto.graph.output], "mode": "ann" if ann else "snn",
            "sites": len(model.graph.sites),
            "level_dtype": LEVEL_DTYPE if levels else None}


def _version() -> str:
    from ..version import __version__
    return __version__


class OnnxRunner:
    """Runs an exported network with onnxruntime's CPU provider.

    ``path_or_proto``: an ``.onnx`` file or a ``ModelProto``; ``threads``: intra-op threads
    (None: onnxruntime's default, all cores).
    """

    def __init__(self, path_or_proto, threads: int | None = None):
        import onnxruntime as ort
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL   # onnxruntime's default, explicit
        if threads is not None:
            opts.intra_op_num_threads = int(threads)
            opts.inter_op_num_threads = 1
        if isinstance(path_or_proto, onnx.ModelProto):
            self.name, source = "ONNX model", path_or_proto.SerializeToString()
        else:
            self.name = source = os.fspath(path_or_proto)
            if not os.path.isfile(source):
                raise UserError(f"{source}: no such file")
        try:
            self.session = ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])
        except Exception as e:
            msg = str(e).strip().splitlines()
            raise UserError(f"{self.name}: onnxruntime cannot load it ({type(e).__name__}: "
                            f"{msg[0] if msg else 'unreadable'})") from None
        inp = self.session.get_inputs()
        if len(inp) != 1:
            raise UserError(f"{self.name}: expected one input, the model has {len(inp)}")
        self.input_name = inp[0].name
        self.input_shape = list(inp[0].shape[1:])         # per sample; symbolic entries stay strings
        outs = [o.name for o in self.session.get_outputs()]
        self.output_name = OUTPUT_NAME if OUTPUT_NAME in outs else outs[0]
        self.level_names = [o for o in outs if o != self.output_name]

    def _prepare(self, x) -> np.ndarray:
        if isinstance(x, torch.Tensor):
            x = x.detach().cpu().numpy()
        x = np.asarray(x)
        if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
            raise UserError(f"{self.name}: input must be numeric, got dtype {x.dtype}")
        got = list(x.shape[1:])
        ok = x.ndim == len(self.input_shape) + 1 and all(
            isinstance(w, str) or w is None or w == g for w, g in zip(self.input_shape, got, strict=True))
        if not ok:
            want = _fmt_shape(self.input_shape)
            raise UserError(f"{self.name}: input of shape {_fmt_shape(x.shape)} has per-sample shape "
                            f"{_fmt_shape(got) if x.ndim else 'none'} but the model expects per-sample shape {want} "
                            f"(an N×{want} batch)")
        if x.shape[0] == 0:
            raise UserError(f"{self.name}: the input batch is empty")
        return np.ascontiguousarray(x, dtype=_F32)

    def run(self, x) -> np.ndarray:
        """Logits for a batch (N × per-sample shape), as a float32 array."""
        return self.session.run([self.output_name], {self.input_name: self._prepare(x)})[0]

    __call__ = run

    def run_with_levels(self, x) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Logits and the int64 spike level of every SFN site (models exported with ``levels=True``)."""
        if not self.level_names:
            raise UserError(f"{self.name}: the model has no spike-level outputs; export it with levels=True")
        res = self.session.run([self.output_name] + self.level_names, {self.input_name: self._prepare(x)})
        return res[0], dict(zip(self.level_names, res[1:], strict=True))


class OnnxBackend:
    """The ``onnx`` backend of :mod:`sfn_deploy.backends`: the exported network on onnxruntime."""
    runs_ann = True
    one_stream = False
    writes_folder = False

    def runner(self, model: ConvertedModel, *, ann: bool = False, threads: int | None = None,
               options: dict | None = None):
        runner = OnnxRunner(to_onnx(model, ann=ann), threads=threads)
        return lambda xb: torch.from_numpy(runner.run(xb.numpy()))

    def layers(self, model: ConvertedModel, x: torch.Tensor, batch_size: int, options: dict | None = None) -> dict:
        """Levels from the level-output export."""
        runner = OnnxRunner(to_onnx(model, levels=True))
        rows = Rows(model.graph)
        outs: list = []
        levels: dict[str, list] = {}
        for i in range(0, len(x), batch_size):
            y, lv = runner.run_with_levels(x[i:i + batch_size].numpy())
            outs.append(y)
            for k, v in lv.items():
                levels.setdefault(k, []).append(rows(k, v).astype(np.int64))
        return {"outputs": np.concatenate(outs), "levels": {k: np.concatenate(v) for k, v in levels.items()},
                "pre": {}}

    def split_time(self, runner, seconds: float) -> tuple[float, float]:
        return 0.0, seconds

    def details(self, runner, model: ConvertedModel, data, batch_size: int) -> dict:
        """Share of spike levels equal to the reference at every site, and the first site that differs."""
        from ..simulators.interpreter import run_with_levels
        levels_runner = OnnxRunner(to_onnx(model, levels=True))
        same = total = 0
        first = None
        order = [s.name for s in model.sites]
        for xb in data.batches(batch_size):
            _, ref = run_with_levels(model.graph, xb)
            _, levels = levels_runner.run_with_levels(xb.numpy())
            for name in order:
                eq = torch.from_numpy(levels[name]).to(torch.int64) == ref[name]
                same += int(eq.sum())
                total += eq.numel()
                if first is None and not bool(eq.all()):
                    first = name
        return {"level_agreement": 100.0 * same / max(total, 1), "first_differing_site": first}

    def parity_info(self, options: dict | None) -> dict:
        return {}

    def export(self, model: ConvertedModel, path: str, *, levels: bool = False, ann: bool = False,
               opset: int = DEFAULT_OPSET, **_other) -> dict:
        return export_onnx(model, path, levels=levels, opset=opset, ann=ann)

    def describe_export(self, info: dict) -> str:
        return (f"wrote {info['path']}: ONNX opset {info['opset']}, {info['nodes']} nodes, {info['bytes']:,} bytes, "
                f"{info['sites']} SFN sites ({info['mode']}); outputs {', '.join(info['outputs'][:4])}"
                f"{' ...' if len(info['outputs']) > 4 else ''}")

    def support(self, model: ConvertedModel) -> str:
        return "full"


BACKEND = OnnxBackend()
