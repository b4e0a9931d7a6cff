"""Named graph passes of the conversion, in the order ``PIPELINE`` lists them.

Each pass takes a :class:`Graph` and changes it in place; ``sfn-deploy inspect``
prints the list, and tests run each one alone.
"""
from __future__ import annotations

import math

import torch

from .ir import Graph, Node
from .neurons import boundaries

# ops a spike tensor passes through unchanged in meaning, so the neuron sits before them
_SPIKE_TRANSPARENT = {"reshape", "permute", "transpose", "flatten", "unsqueeze", "squeeze", "roll", "upsample_nearest",
                      "max_pool2d", "avg_pool2d", "adaptive_avg_pool2d", "mean", "sum"}


def _spike_transparent(v: Node) -> bool:
    """Spikes pass through v unchanged in meaning (zero padding adds silent positions; other values do not)."""
    return v.op in _SPIKE_TRANSPARENT or (v.op == "pad" and v.attrs.get("value", 0.0) == 0.0)


def fold_batchnorm(graph: Graph) -> Graph:
    """Fold an inference BatchNorm into the convolution or linear layer right before it."""
    users = graph.users()
    for bn in [n for n in graph.nodes if n.op == "batch_norm"]:
        prev = graph[bn.inputs[0]]
        if prev.op not in ("conv2d", "linear") or len(users[prev.name]) != 1:
            continue
        if prev.op == "linear" and len(prev.shape) != 2:
            continue                   # BatchNorm1d over tokens normalises another axis
        p = bn.params
        scale = p.get("weight", torch.ones_like(p["running_var"])) / torch.sqrt(p["running_var"] + bn.attrs["eps"])
        shift = p.get("bias", torch.zeros_like(p["running_mean"])) - p["running_mean"] * scale
        w = prev.params["weight"]
        prev.params["weight"] = w * scale.reshape(-1, *([1] * (w.dim() - 1)))
        bias = prev.params.get("bias", torch.zeros(w.shape[0], dtype=w.dtype))
        prev.params["bias"] = bias * scale + shift
        prev.source = f"{prev.source} + {bn.source} (folded)"
        graph.replace_uses(bn.name, prev.name)
        graph.remove(bn.name)
    return graph


_SCORE_PATH = {"mul", "div", "add", "sub", "reshape", "permute", "transpose", "flatten", "unsqueeze", "squeeze"}


def _scores(product: Node, users: dict) -> bool:
    """The product's values reach a softmax through scalings, masks and layout ops only: it is q·kᵀ (however
    written: a transposed key, a permuted one from a decomposed einsum)."""
    todo, seen = [product], set()
    while todo:
        for u in users[todo.pop().name]:
            if u.op == "softmax":
                return True
            if u.op in _SCORE_PATH and u.name not in seen:
                seen.add(u.name)
                todo.append(u)
    return False


def _role(src: Node, consumer: Node, slot: int, users: dict) -> str:
    if src.op == "softmax":
        return "post-softmax"
    if consumer.op == "matmul":
        if _scores(consumer, users):                         # q·kᵀ
            return "q" if slot == 0 else "k"
        return "v" if slot == 1 else "attn"
    if src.op == "matmul":
        return "attn-out"
    tail = consumer.source.split(",")[0].split(".")[-1] if consumer.source else consumer.name
    return f"post-{src.op}" if src.op in ("relu", "gelu") else f"pre-{tail}"


def insert_sfn(graph: Graph, levels: int = 8, fire: str = "sformer", rounding: str = "paper",
               softmax_levels: str = "dense", input_spikes: bool = False) -> Graph:
    """Put a Scale-and-Fire neuron on every activation that feeds a weight layer or an activation product.

    The neuron sits on the value that the consumer reads, moved back through
    layout and pooling ops (spikes pass through them) while that value has no other
    reader. A ReLU right before a neuron is absorbed: the neuron's negative branch is
    off, which is the same function. The network input and stored constants stay analog.
    Post-softmax neurons take :func:`~sfn_deploy.neurons.post_softmax_levels` of the fire function's levels.
    """
    from .neurons import site_levels

    users = graph.users()
    sources: dict[str, tuple[Node, Node, int]] = {}
    for node in graph.nodes:
        slots = [0] if node.op in ("conv2d", "linear") else [0, 1] if node.op == "matmul" else []
        for slot in slots:
            v = graph[node.inputs[slot]]
            while _spike_transparent(v) and len(users[v.inputs[0]]) == 1:
                v = graph[v.inputs[0]]
            if v.op in ("constant", "sfn") or (not input_spikes and (v.op == "input" or _analog_only(v, graph))):
                continue
            sources.setdefault(v.name, (v, node, slot))
    for name, (src, consumer, slot) in sources.items():
        absorb = src.op == "relu"
        kind = "softmax" if src.op == "softmax" else "dual"
        attrs = {"kind": kind, "fire": fire, "M": levels, "levels": site_levels(levels, fire, kind, softmax_levels),
                 "rounding": rounding, "lam": 1.0,
                 "theta_pos": 0.0, "theta_neg": 0.0, "o_max": 0.0,
                 "role": "input" if src.op == "input" else _role(src, consumer, slot, users),
                 "absorbs": "relu" if absorb else None, "feeds": consumer.name}
        sfn = Node(graph.fresh_name(f"sfn_{name}"), "sfn", [src.inputs[0] if absorb else name], attrs, {},
                   list(src.shape), src.bdim, src.source)
        graph.insert_after(name, sfn)
        graph.replace_uses(name, sfn.name, skip=sfn.name)
        if absorb:
            graph.remove(name)
        configure(sfn, 1.0)
    return graph


def _analog_only(v: Node, graph: Graph) -> bool:
    """True when v is computed from the network input by layout ops only (the input layer stays analog)."""
    while v.kind == "layout" and v.inputs:
        v = graph[v.inputs[0]]
    return v.op in ("input", "constant")


# Repeated values (docs/concepts.md, "Repeated values"): a channel's most frequent input value counts when it
# fills at least REPEATED_SHARE of that channel's positions in calibration and its magnitude is at least
# REPEATED_FLOOR·θ (a cap at a smaller value would force steps finer than the λ search's finest, λ = 0.02, and its
# switch-off jump, 2v, is under 0.04θ: such a value is left to round like any other).
REPEATED_SHARE = 0.1
REPEATED_FLOOR = 0.02


def repeated_caps(node: Node) -> tuple[float, float]:
    """The largest repeated value of each polarity of a site (as magnitudes), or inf where there is none:
    the step of that branch never exceeds it, so that value stays exactly a level (level 1) however large λ
    is, instead of rounding to zero at once at every position that holds it (:func:`configure`)."""
    p, a = node.params, node.attrs
    if "mode_value" not in p or a.get("kind") != "dual" or "method" in a:
        return math.inf, math.inf
    v, share = p["mode_value"].double(), p["mode_share"].double()
    caps = []
    for sign, theta in ((1.0, a["theta_pos"]), (-1.0, a["theta_neg"])):
        mags = (sign * v)[(share >= REPEATED_SHARE) & (sign * v >= REPEATED_FLOOR * theta) & (sign * v > 0)]
        caps.append(float(mags.max()) if mags.numel() and theta > 0 else math.inf)
    return caps[0], caps[1]


def configure(node: Node, lam: float) -> Node:
    """Derive an SFN's step and float32 firing boundaries from θ⁺, θ⁻ (or o_max) and λ.

    The step of a branch is λθ, but never more than the site's largest repeated value of that sign
    (:func:`repeated_caps`; SFN sites of the sfn method only)."""
    a = node.attrs
    if not 0 < lam <= 1:
        raise ValueError(f"scale factor λ must lie in (0, 1], got {lam}")
    a["lam"] = float(lam)
    b = torch.tensor(boundaries(a["levels"], a["rounding"]), dtype=torch.float64)
    if a["kind"] == "softmax":
        step_pos, step_neg = a["o_max"] / max(a["levels"]), 0.0
        a["theta_softmax"] = step_pos / lam
    else:
        cap_pos, cap_neg = repeated_caps(node)
        step_pos = min(lam * a["theta_pos"], cap_pos)
        step_neg = 0.0 if a.get("absorbs") else min(lam * a["theta_neg"], cap_neg)
    empty = torch.zeros(0, dtype=torch.float32)
    node.params["bounds_pos"] = (b * step_pos).to(torch.float32) if step_pos > 0 else empty
    node.params["bounds_neg"] = (b * step_neg).to(torch.float32) if step_neg > 0 else empty.clone()
    node.params["steps"] = torch.tensor([step_pos, step_neg], dtype=torch.float32)
    node.params["table"] = torch.tensor([0] + list(a["levels"]), dtype=torch.int64)
    return node


def set_levels(graph: Graph, m: int, softmax_levels: str, fire: str | None = None) -> Graph:
    """Give every site M = ``m`` levels per polarity, and ``fire``'s levels when given (θ, calibration and λ
    kept)."""
    from .neurons import site_levels
    for s in graph.sites:
        s.attrs["M"] = m
        if fire is not None:
            s.attrs["fire"] = fire
        s.attrs["levels"] = site_levels(m, s.attrs["fire"], s.attrs["kind"], softmax_levels)
        configure(s, s.attrs["lam"])
    return graph


def set_scale(graph: Graph, lam: float | dict[str, float]) -> Graph:
    """Set one shared λ, or λ per site (dict site name → λ; missing sites keep theirs)."""
    for node in graph.sites:
        value = lam.get(node.name, node.attrs["lam"]) if isinstance(lam, dict) else lam
        configure(node, value)
    return graph


def input_readers(graph: Graph, start: Node | None = None) -> list[Node] | None:
    """The weight layers that read the network input (or ``start``, e.g. the input neuron) through layout ops
    (and input neurons), or None when anything else reads it (a residual, a host op, explicit padding)."""
    users, readers, todo = graph.users(), [], [start or graph.input]
    while todo:
        for u in users[todo.pop().name]:
            if (u.kind == "layout" and u.op != "pad") or (u.op == "sfn" and u.attrs.get("role") == "input"):
                todo.append(u)
            elif u.op in ("linear", "conv2d"):
                readers.append(u)
            else:
                return None
    return readers


def folds_offset(graph: Graph, readers: list[Node]) -> bool:
    """Whether a constant added to the input folds exactly into its readers' biases: linear layers and unpadded
    convolutions; or convolutions that all read the input itself with the same zero padding, which then moves
    in front of the input neuron with the padding value −low (:func:`offset_input`)."""
    if all(r.op == "linear" or not any(r.attrs["padding"]) for r in readers):
        return True

    def reads_input(r: Node) -> bool:       # the input itself, or the input neuron on it (after insert_sfn)
        v = graph[r.inputs[0]]
        return v.op == "input" or (v.attrs.get("role") == "input" and graph[v.inputs[0]].op == "input")
    return (all(r.op == "conv2d" and reads_input(r) for r in readers)
            and len({tuple(r.attrs["padding"]) for r in readers}) == 1)


def offset_input(graph: Graph, low: float) -> None:
    """Feed the input neuron x − low (``low``: the smallest value of the traced images), so that the darkest
    value, often the background, fires no spike; each layer that reads it gets W·low added to its bias, which
    keeps the network's function (the readers must pass :func:`folds_offset`). A padded convolution's zero
    padding becomes an explicit padding of x − low with −low before the neuron (the border reads x = 0 as
    before, now as spikes: a value filling the border is kept exactly by the repeated-value step cap)."""
    site = next(s for s in graph.sites if s.attrs.get("role") == "input")
    readers = input_readers(graph)
    if low == 0 or not readers or not folds_offset(graph, readers):
        raise ValueError("the input offset does not fold into the layers that read the input")
    padded = [r for r in readers if r.op == "conv2d" and any(r.attrs["padding"])]
    for r in readers:
        w = r.params["weight"]
        shift = low * w.sum(dim=tuple(range(1, w.dim())))
        r.params["bias"] = r.params["bias"] + shift if "bias" in r.params else shift
    src = graph[site.inputs[0]]
    node = Node(graph.fresh_name("input_offset"), "add", [src.name], {"other": -float(low)}, {},
                list(src.shape), src.bdim, "")
    graph.insert_after(src.name, node)
    site.inputs[0] = node.name
    if padded:
        ph, pw = (int(v) for v in padded[0].attrs["padding"])
        shape = list(src.shape[:-2]) + [src.shape[-2] + 2 * ph, src.shape[-1] + 2 * pw]
        pad = Node(graph.fresh_name("input_padding"), "pad", [node.name], {"pad": [pw, pw, ph, ph],
                                                                          "value": -float(low)},
                   {}, shape, src.bdim, "")
        graph.insert_after(node.name, pad)
        site.inputs[0] = pad.name
        site.shape = list(shape)
        for r in readers:
            r.attrs["padding"] = [0, 0]
