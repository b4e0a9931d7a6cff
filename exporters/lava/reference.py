"""The integer reference: the torch SNN as Lava's fixed point computes it.

:func:`integer_reference` takes a converted model and the fixed-point plan deployed from it (a bundle's, or
lowered here) and returns a converted model whose graph, run by sfn-deploy's ordinary torch interpreter, gives
the spike levels of Lava's fixed-point simulation. It reads the plan's own arrays; nothing is re-quantised:

* **sites** fire their integer levels (steps 1): a synaptic layer reads levels, as on the chip, and a host
  operation reads level × step in float32, as the host block decodes them;
* **weight layers** are one convolution / linear layer per synapse group of the plan (polarity, coarse and fine
  halves of split weights) holding the plan's integers, the coarse group's sum multiplied by 2^shift; a dual
  site's groups read its positive and negative levels apart; average pooling folded into the weights reads the
  site's own spikes, as in the plan. The groups add up to the chip's integer accumulator;
* **a neuron fed by a weight layer** gets (accumulator + the plan's integer bias) × its scale, saturated at the
  24-bit membrane's ends, and fires at its integer thresholds × scale (thresholds the saturated membrane never
  reaches stay unreachable);
* **a value the host sends to the chip** (the input encoder, a neuron after a residual sum or an activation on
  the host, an analog value read by a weight layer) is quantised as the host block does it: rint of the value
  times 1/scale in float32, clipped to ±(2^23 − 1), then in integer units;
* **a value the host decodes** (a weight layer's sum read by a residual add, an activation, the output decoder)
  is accumulator × scale + the plan's float32 bias, in float32, as the host block does it.

Why it is bit-exact: every quantity on the chip's side is an integer times a scale, and float32 holds integers up
to 2^24 exactly, so each group's sum is exact in any summation order where Σ|w|·|x| stays below 2^24, and the
sum of the groups is exact while it stays below 2^24: :func:`run_reference` checks both on the data it runs
(``float32_exact``, ``largest_sum``). The chip's own limits are Lava's counters (``overflows``, ``saturations``,
the Conv wrap-arounds): beyond them Lava wraps or saturates where the reference does not. Products with a scale
that is not a power of two (the 8-bit input's) are float32 products on both sides (the host block computes them
in float32 too), strictly increasing on 24-bit integers, so comparing them with the thresholds × scale is the
chip's integer comparison. The host blocks compute with torch's kernels one sample at a time, the reference a
batch at a time; for the elementwise host work of CNNs (residual adds, ReLU6, padding, max pooling,
concatenation) that gives the same bits. Only the graded lowering is built (threshold channels: not).
"""
from __future__ import annotations

import dataclasses
import time

import numpy as np
import torch

from ...errors import UserError
from ...ir import Graph, Node
from ...model_file import ConvertedModel
from ...ops import apply
from ...samples import regular
from ...simulators.interpreter import Event, run
from ...torch_backend import SiteRecorder
from .plan import LATTICE_OPS, Plan, _Lowering, lower

LIM = (1 << 23) - 1                 # what the host clips an integer it sends to (24-bit signed payloads)
_MAGIC = float(1 << 23)             # x + 2^23 − 2^23 is rint(x) in float32 for 0 ≤ x < 2^23 (ties to even)
SYNAPSES = ("dense", "sparse", "conv")


def _f32(v: float) -> float:
    return float(np.float32(v))


def _torch_weight(b) -> np.ndarray:
    """A synaptic block's integers in torch's layout: Conv (C_out, kW, kH, C_in/g) flipped back to
    (C_out, C_in/g, kH, kW); Dense and Sparse stored as 2w (Lava drops the lowest bit of mixed-sign weights)."""
    w = np.asarray(b.arrays["weight"], np.float64)
    if b.kind == "conv":
        return np.ascontiguousarray(w.transpose(0, 3, 2, 1)[:, :, ::-1, ::-1])
    return w / 2


def _snap(thr: np.ndarray, top: int) -> np.ndarray:
    """Integer thresholds a membrane that never exceeds ``top`` can reach, the others replaced by top + 1, top + 2,
    … (still ascending, never reached): float32 holds them exactly."""
    t = np.asarray(thr, np.int64).copy()
    far = t > top
    t[far] = top + 1 + np.arange(int(far.sum()))
    return t


def host_integers(emit, v: str, shape: list, scale: float, base: str) -> str:
    """Nodes computing what a host block sends to the chip for value v at ``scale``: rint(v · fl32(1/scale)),
    the product in float32, clipped to ±(2^23 − 1) (host.py's ``int`` encoding). The op table has no rounding:
    x + 2^23 − 2^23 rounds 0 ≤ x < 2^23 to the nearest integer, ties to even, in float32, so each sign's half
    goes through it. ``emit(op, inputs, shape, attrs, base=...)`` adds a node and returns its name."""
    y = emit("mul", [v], shape, {"other": _f32(1.0 / scale)}, base=base)
    y = emit("hardtanh", [y], shape, {"min_val": -float(LIM), "max_val": float(LIM)}, base=base)
    halves = []
    for sign in (1.0, -1.0):
        h = y if sign > 0 else emit("mul", [y], shape, {"other": -1.0}, base=base)
        h = emit("relu", [h], shape, base=base)
        h = emit("add", [h], shape, {"other": _MAGIC}, base=base)
        halves.append(emit("sub", [h], shape, {"other": _MAGIC}, base=base))
    return emit("sub", halves, shape, base=base)


class _Builder:
    def __init__(self, model: ConvertedModel, plan: Plan):
        if plan.precision != "fixed_pt" or plan.lowering != "graded":
            raise UserError("the integer reference follows a fixed-point plan with the graded lowering (got "
                            f"{plan.precision}, {plan.lowering})")
        self.model, self.plan = model, plan
        self.low = _Lowering(model.graph, model.input_shape, "graded", "fixed_pt", None,
                             avg_pool="layer" if plan.pooling_layers() else "folded")
        self.low.analyse()                        # lattice (values carrying a site's levels) and folded pools
        self.g = g = self.low.g                   # with the identity synapses of residual sums on cores
        self.pooled: dict[str, dict] = {}         # a pooling layer's value (and flattens of it) -> {polarity: sums}
        self.nodes: list[Node] = []
        self.taken = {n.name for n in g}
        self.val: dict[str, str] = {}            # graph value -> its node here (levels for spikes)
        self.bdims: dict[str, int | None] = {}    # node here -> its batch axis
        self.cache: dict[tuple, str] = {}
        self.neuron = {b.ir[0]: b for b in plan.blocks if b.kind == "neuron" and not b.attrs.get("pool")}
        self.groups: dict[str, list] = {}
        for b in plan.blocks:
            if b.kind in SYNAPSES:
                self.groups.setdefault(b.attrs["layer"], []).append(b)
        self.sums: list[str] = []                 # group layers: Σ|w|·|x| < 2^24 makes their float32 sums exact
        self.totals: list[str] = []               # sums of exact integers: exact while |total| < 2^24
        self.decode: dict[str, tuple] = {}        # weight layer read by the host -> (scale, float32 bias or None)
        for b in plan.blocks:
            for spec in b.attrs.get("inputs", []) if b.kind == "host" else []:
                if spec.get("decode") == "acc":
                    self.decode[spec["value"]] = (spec["scale"], b.arrays.get(f"{spec['port']}.bias"))

    # -- nodes
    def emit(self, op: str, inputs: list, shape, attrs: dict | None = None, params: dict | None = None,
             base: str = "ref", name: str | None = None, bdim: int | None = None) -> str:
        """A node; its batch axis, unless given, is its first batched input's (the reference's own nodes are
        pointwise or act on the last axis), so folded and sequence-first values keep their layout
        (sfn_deploy.samples); a constant has none and is passed over."""
        if name is None:
            name, k = base, 1
            while name in self.taken:
                k += 1
                name = f"{base}_{k}"
        self.taken.add(name)
        if op == "constant":
            bdim = None                           # no batch axis: it broadcasts over the batch
        elif bdim is None:
            known = [self.bdims[i] for i in inputs if i in self.bdims]
            bdim = next((b for b in known if b is not None), None if known else 0)
        self.bdims[name] = bdim
        self.nodes.append(Node(name, op, list(inputs), dict(attrs or {}), dict(params or {}), list(shape), bdim,
                               "integer reference"))
        return name

    def row_constant(self, values: np.ndarray, value: str, base: str) -> str:
        """A per-sample vector (a bias in the plan's flattened order) as a constant broadcasting over the batch:
        the sample's shape where the batch axis is first and alone, else one row, which every row repeats
        (a linear layer's bias over tokens, windows or sequence-first rows)."""
        node, sh = self.g[value], self.shape(value)
        if regular(node):
            v, shape = values.reshape(sh[1:]), sh[1:]
        else:
            rows = values.reshape(-1, sh[-1])
            if not (rows == rows[:1]).all():
                raise UserError(f"the integer reference: {value} has a bias that differs between its rows")
            v, shape = rows[0], [sh[-1]]
        return self.emit("constant", [], shape, params={"value": torch.from_numpy(np.ascontiguousarray(v))},
                         base=base, bdim=0)

    def shape(self, value: str) -> list:
        return list(self.g[value].shape)

    def values(self, value: str) -> str:
        """Level × step in float32 (what a host block decodes from a site's spikes) of a lattice value."""
        key = ("values", value)
        if key not in self.cache:
            site = self.g[self.low.lattice[value]]
            s = site.params["steps"].float().tolist()
            lv, sh = self.val[value], self.shape(value)
            if site.params["bounds_neg"].numel() and s[0] != s[1]:
                pos = self.emit("mul", [self.emit("relu", [lv], sh, base=f"{value}__pos")], sh, {"other": s[0]},
                                base=f"{value}__pos_values")
                neg = self.emit("relu", [self.emit("mul", [lv], sh, {"other": -1.0}, base=f"{value}__minus")], sh,
                                base=f"{value}__neg")
                neg = self.emit("mul", [neg], sh, {"other": s[1]}, base=f"{value}__neg_values")
                self.cache[key] = self.emit("sub", [pos, neg], sh, base=f"{value}__values")
            else:
                self.cache[key] = self.emit("mul", [lv], sh, {"other": s[0]}, base=f"{value}__values")
        return self.cache[key]

    def host_value(self, value: str) -> str:
        """A value as the host holds it: a weight layer's decoded sum, a site's level × step, or itself."""
        if self.low.cls(self.g[value]) == "synapse":
            key = ("decoded", value)
            if key not in self.cache:
                scale, bias = self.decode.get(value, (self.groups[value][0].attrs["scale"], None))
                sh = self.shape(value)
                v = self.emit("mul", [self.accumulator(value)], sh, {"other": _f32(scale)}, base=f"{value}__decoded")
                if bias is not None:
                    c = self.row_constant(np.asarray(bias, np.float32), value, f"{value}__bias")
                    v = self.emit("add", [v, c], sh, base=f"{value}__plus_bias")
                self.cache[key] = v
            return self.cache[key]
        if value in self.low.lattice:
            return self.values(value)
        return self.val[value]

    def quantised(self, value: str, scale: float) -> str:
        """rint(value · fl32(1/scale)) in float32, clipped to ±(2^23 − 1): the integers the host sends."""
        key = ("int", value, scale)
        if key not in self.cache:
            self.cache[key] = host_integers(self.emit, self.host_value(value), self.shape(value), scale,
                                            f"{value}__int")
        return self.cache[key]

    # -- weight layers
    def group_input(self, n: Node, b) -> str:
        x, pol = b.attrs["input"], b.attrs["polarity"]
        if pol == "analog":
            return self.quantised(x, b.attrs["scale"] / 2.0 ** b.attrs["weight_exp"])
        if x in self.pooled:                      # a pooling layer's integer window sums
            return self.pooled[x][pol]
        if x in self.low.folds:                   # folded pooling: the site's own spikes
            site = self.low.folds[x]
            src, sh = self.val[site], self.shape(site)
            if n.op == "linear":
                key = ("flat", site)
                if key not in self.cache:
                    self.cache[key] = self.emit("flatten", [src], [1, int(np.prod(sh[1:]))],
                                                {"start": 1, "end": -1}, base=f"{site}__flat")
                src, sh = self.cache[key], [1, int(np.prod(sh[1:]))]
        else:
            site, src, sh = self.low.lattice[x], self.val[x], self.shape(x)
        key = (pol, src)
        if key not in self.cache:
            dual = self.g[site].params["bounds_neg"].numel() > 0
            if pol == "pos":
                self.cache[key] = self.emit("relu", [src], sh, base=f"{site}__pos") if dual else src
            else:
                minus = self.emit("mul", [src], sh, {"other": -1.0}, base=f"{site}__minus")
                self.cache[key] = self.emit("relu", [minus], sh, base=f"{site}__neg")
        return self.cache[key]

    def accumulator(self, layer: str) -> str:
        """The integer sum the chip's neuron (or host block) receives from every synapse group of the layer."""
        key = ("acc", layer)
        if key in self.cache:
            return self.cache[key]
        n = self.g[layer]
        parts: dict[str, list] = {}
        for b in self.groups[layer]:
            if b.attrs.get("copies", 1) != 1 or b.attrs.get("copy_ids") is not None:
                raise UserError(f"the integer reference does not model threshold channels ({b.name})")
            w = torch.from_numpy(_torch_weight(b).astype(np.float32))
            if n.op == "conv2d":
                a = b.attrs
                attrs = {"stride": a["stride"][::-1], "padding": a["padding"][::-1], "dilation": a["dilation"][::-1],
                         "groups": a["groups"]}
                s = self.emit("conv2d", [self.group_input(n, b)], n.shape, attrs, {"weight": w}, base=b.name)
            else:
                s = self.emit("linear", [self.group_input(n, b)], n.shape, {}, {"weight": w}, base=b.name)
            self.sums.append(s)
            if b.attrs.get("shift", 0):
                s = self.emit("mul", [s], n.shape, {"other": float(2 ** b.attrs["shift"])}, base=f"{b.name}__shifted")
            parts.setdefault(b.attrs["polarity"], []).append(s)
        sums = []
        for group in parts.values():
            acc = group[0]
            for s in group[1:]:
                acc = self.emit("add", [acc, s], n.shape, base=f"{layer}__acc")
                self.totals.append(acc)
            sums.append(acc)
        acc = sums[0]
        for s in sums[1:]:
            acc = self.emit("add", [acc, s], n.shape, base=f"{layer}__acc")
            self.totals.append(acc)
        self.cache[key] = acc
        return acc

    # -- neurons
    def site(self, n: Node) -> None:
        b = self.neuron[n.name]
        scale = float(b.attrs["scale"])
        src = n.inputs[0]
        if self.low.cls(self.g[src]) == "clip":              # the neuron reads the clipped layer's sum itself
            src = self.g[src].inputs[0]
        sh = self.shape(n.name)
        s32 = np.float32(scale)
        kind = self.low.cls(self.g[src])
        if kind in ("synapse", "resum"):       # v = acc (both operands' of a residual sum) + bias, saturated
            layers = [src] if kind == "synapse" else self.g[src].inputs
            v = self.accumulator(layers[0])
            for other in layers[1:]:
                v = self.emit("add", [v, self.accumulator(other)], sh, base=f"{src}__acc")
                self.totals.append(v)
            bias = np.asarray(b.arrays["bias"], np.int64)
            if np.any(bias):
                if np.abs(bias).max() >= 2 ** 24:
                    raise UserError(f"the integer reference: bias of {b.name} beyond 24 bits")
                c = self.row_constant(bias.astype(np.float32), n.name, f"{n.name}__bias")
                v = self.emit("add", [v, c], sh, base=f"{n.name}__biased")
                self.totals.append(v)
            lo, hi = -(1 << 23), (1 << 23) - 1
            top_pos, top_neg = hi, -lo
        else:                                                  # the host sends rint(value / scale), clipped
            v = self.quantised(src, scale)
            lo, hi = -LIM, LIM
            top_pos = top_neg = LIM
        v = self.emit("mul", [v], sh, {"other": float(s32)}, base=f"{n.name}__pre")
        v = self.emit("hardtanh", [v], sh, {"min_val": float(np.float32(lo) * s32),
                                            "max_val": float(np.float32(hi) * s32)}, base=f"{n.name}__pre")
        params = {"bounds_pos": torch.from_numpy(np.float32(_snap(b.arrays["thr_pos"], top_pos)) * s32),
                  "bounds_neg": torch.from_numpy(np.float32(_snap(b.arrays["thr_neg"], top_neg)) * s32),
                  "steps": torch.ones(2, dtype=torch.float32), "table": n.params["table"]}
        self.val[n.name] = self.emit("sfn", [v], n.shape, n.attrs, params, name=n.name)

    def sum_pool(self, n: Node) -> None:
        """A pooling layer: per polarity, the plan's depthwise Conv of ones over the site's levels of that sign
        (integer sums, exact in float32); the sum neurons fire the sum itself."""
        site = self.low.pool_layers[n.name][0]
        src, sh = self.val[site], self.shape(site)
        out = {}
        for b in self.plan.blocks:
            if b.kind != "conv" or b.attrs.get("layer") != n.name or b.attrs.get("polarity") != "pool":
                continue
            pol = "neg" if b.name.endswith("__neg") else "pos"
            if pol == "pos":
                lv = self.emit("relu", [src], sh, base=f"{site}__pos") \
                    if self.g[site].params["bounds_neg"].numel() else src
            else:
                lv = self.emit("relu", [self.emit("mul", [src], sh, {"other": -1.0}, base=f"{site}__minus")], sh,
                               base=f"{site}__neg")
            a = b.attrs
            attrs = {"stride": a["stride"][::-1], "padding": a["padding"][::-1], "dilation": [1, 1],
                     "groups": a["groups"]}
            w = torch.from_numpy(_torch_weight(b).astype(np.float32))
            out_shape = [sh[0], *a["out_chw"]]
            v = self.emit("conv2d", [lv], out_shape, attrs, {"weight": w}, base=b.name)
            if list(n.shape) != out_shape:        # a mean without keepdim: (N, C)
                v = self.emit("flatten", [v], list(n.shape), {"start": 1, "end": -1}, base=f"{b.name}__flat")
            out[pol] = v
        self.pooled[n.name] = out

    # -- the graph
    def build(self) -> Graph:
        g, low = self.g, self.low
        for n in g:
            c = low.cls(n)
            if c == "sumpool":
                self.sum_pool(n)
                continue
            if c == "alias" and n.inputs[0] in self.pooled:     # a flatten between a pooling layer and its readers
                self.pooled[n.name] = {pol: self.emit(n.op, [v], n.shape, n.attrs, n.params, base=f"{n.name}__{pol}")
                                       for pol, v in self.pooled[n.inputs[0]].items()}
                continue
            if c in ("pool", "alias"):
                raise UserError("the integer reference does not model threshold channels")
            if c == "fold":                         # read through the folded weights instead
                continue
            if c == "synapse":
                self.accumulator(n.name)
            elif c in ("resum", "clip"):            # done by the neurons they feed (site())
                continue
            elif c == "neuron":
                self.site(n)
            elif n.op in ("input", "constant"):
                self.val[n.name] = self.emit(n.op, [], n.shape, n.attrs, n.params, name=n.name, bdim=n.bdim)
            else:                                   # host work, on what the host holds
                passes = n.op in LATTICE_OPS and n.name in low.lattice      # levels pass through
                ins = [self.val[i] if passes or g[i].op == "constant" else self.host_value(i) for i in n.inputs]
                self.val[n.name] = self.emit(n.op, ins, n.shape, n.attrs, n.params, name=n.name, bdim=n.bdim)
        out = self.host_value(g.output)
        return Graph(self.nodes, out, g.timesteps, g.method, g.output_parts)


def integer_reference(model: ConvertedModel, plan: Plan | None = None,
                      input_abs_max: float | None = None) -> ConvertedModel:
    """The torch SNN as Lava's fixed point computes it (module docstring): same sites (names, level tables),
    the plan's integer weights, biases and thresholds, the host's integer conversions. ``plan``: the fixed-point
    plan that runs (a bundle's); by default lowered here from the model (input range: ``input_abs_max`` or the
    one conversion recorded)."""
    if plan is None:
        if input_abs_max is None:
            input_abs_max = model.metrics.get("input_abs_max")
        plan = lower(model, "graded", "fixed_pt", input_abs_max)
    b = _Builder(model, plan)
    graph = b.build()
    return dataclasses.replace(model, graph=graph, metrics={"integer_reference": {"sums": b.sums, "totals": b.totals}},
                               search={})


class _Recorder(SiteRecorder):
    """Each site's signed levels and pre-activations (as the torch backend records them), and the certificate
    of exactness: the largest Σ|w|·|x| of any synapse group (same layer, |weights| on |inputs|) and the largest
    |sum| of exact integers, in integer units."""

    def __init__(self, ref: ConvertedModel):
        super().__init__(ref.graph)
        info = ref.metrics["integer_reference"]
        self.sums, self.totals = set(info["sums"]), set(info["totals"])
        self.largest = 0.0
        self.absolute: dict[str, Node] = {}

    def __call__(self, event: Event) -> None:
        node = event.node
        if event.position is not None:
            super().__call__(event)
        elif node.name in self.sums:
            a = self.absolute.get(node.name)
            if a is None:
                a = self.absolute[node.name] = Node(node.name, node.op, node.inputs, node.attrs,
                                                    {"weight": node.params["weight"].abs()}, node.shape)
            self.largest = max(self.largest, float(apply(a, [event.args[0].abs()], None, len(event.args[0])).max()))
        elif node.name in self.totals and event.out is not None:
            self.largest = max(self.largest, float(event.out.abs().max()))


def run_reference(ref: ConvertedModel, x: torch.Tensor, batch_size: int = 256) -> dict:
    """The integer reference on samples x: ``outputs``, per site ``levels`` and ``pre`` (numpy, one row per
    sample, as the torch backend gives them), and ``float32_exact``: whether every sum it computed stayed below
    2^24 in integer units (then its float32 arithmetic is the chip's integer arithmetic), with the largest
    (``largest_sum``, integer units)."""
    keep = _Recorder(ref)
    outs = [run(ref.graph, x[i:i + batch_size], hook=keep).numpy() for i in range(0, len(x), batch_size)]
    cat = lambda d: {k: np.concatenate(v) for k, v in d.items()}     # noqa: E731
    return {"outputs": np.concatenate(outs), "levels": cat(keep.levels), "pre": cat(keep.pre),
            "largest_sum": keep.largest, "float32_exact": keep.largest < 2 ** 24}


def _top1(a: np.ndarray, b: np.ndarray) -> float:
    n = len(a)
    return 100.0 * float((a.reshape(n, -1).argmax(1) == b.reshape(n, -1).argmax(1)).mean())


def compare_with_reference(model: ConvertedModel, plan: Plan, data, lava_outputs: np.ndarray,
                           batch_size: int = 256) -> dict:
    """What ``simulate --backend lava --precision fixed_pt`` adds: Lava against the integer reference (the
    agreement a deployment is judged on: 100 % where Lava runs the plan as planned) and the integer reference
    against the float torch SNN, with both accuracies on labelled data (what quantisation costs)."""
    t0 = time.perf_counter()
    ref = integer_reference(model, plan)
    x = data.in_memory().x          # Lava ran the whole set as one stream: it is bounded (--limit) and decoded
    r = run_reference(ref, x, batch_size)
    snn = np.concatenate([run(model.graph, x[i:i + batch_size]).numpy() for i in range(0, len(data), batch_size)])
    out, lava = r["outputs"], np.asarray(lava_outputs)
    n = len(out)
    y = data.y.numpy() if getattr(data, "labeled", True) else None

    def acc(o: np.ndarray) -> float | None:          # top-1 %, None on unlabeled data
        return None if y is None else 100.0 * float((o.reshape(n, -1).argmax(1) == y).mean())
    return {"reference": "the torch SNN with the fixed-point plan's integers (exporters/lava/reference.py)",
            "lava_prediction_agreement": _top1(lava, out),
            "lava_max_abs_diff": float(np.abs(lava.reshape(out.shape) - out).max()),
            "snn_prediction_agreement": _top1(out, snn),
            "snn_max_abs_diff": float(np.abs(out - snn).max()),
            "accuracy": acc(out), "snn_accuracy": acc(snn),
            "float32_exact": r["float32_exact"], "largest_sum": r["largest_sum"],
            "seconds": time.perf_counter() - t0}


def describe(c: dict) -> str:
    """The text line of :func:`compare_with_reference`."""
    if "unavailable" in c:
        return f"integer reference: not built ({c['unavailable']})"
    acc = "" if c["accuracy"] is None else f", accuracy {c['accuracy']:.2f}% (float SNN {c['snn_accuracy']:.2f}%)"
    exact = "" if c["float32_exact"] else " [sums beyond 2^24: float32 not exact]"
    return (f"integer reference (torch SNN with the plan's integers): Lava top-1 agreement "
            f"{c['lava_prediction_agreement']:.2f}% (max|Δ| {c['lava_max_abs_diff']:.3g}){exact}; against the "
            f"float SNN {c['snn_prediction_agreement']:.2f}%{acc}")
