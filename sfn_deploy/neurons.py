"""Spiking neurons of the conversion theory, as plain tensor functions.

Every function here is elementwise and stateless across samples: the state they
carry is the membrane potential inside one call (IF over T steps) or nothing at
all (single-timestep neurons). They are the definitions that the converted
network, the exporters and the tests share.

Notation (SPEC §4): θ threshold, λ ∈ (0, 1] scale factor, y_1 < ... < y_N the
integer output levels of a fire function, T timesteps.

The fire rule of an IR neuron node (``sfn``, ``if_neuron``: attrs and params in :mod:`sfn_deploy.ir`)
lives here once: :func:`crossings` counts the boundaries an input crosses, and everything else
(:func:`spike_index`, :func:`spike_levels`, :func:`level_values`, :func:`fire`, and :func:`sfn_level`
on bare tensors) reads levels from it. :func:`level_table` is cached per node in :data:`NODE_CACHE`,
which also holds the compiled fire tables of :mod:`sfn_deploy.simulators.firegrid`.
"""
from __future__ import annotations

import weakref
from collections.abc import Callable

import torch

FIRE_FUNCTIONS = ("sformer", "linear", "exponential")
ROUNDINGS = ("paper", "nearest", "floor")
# Levels of a post-softmax neuron (docs/concepts.md "The neuron"): dense = every integer up to the fire function's
# top level (same step o_max / y_N, same top level, same graded payload), fire = the fire function's own levels
# (the paper's). A top level above DENSE_TOP keeps the fire function's levels (SFormer M ≥ 15, the exponential
# function from M = 8): up to it the ONNX export finds its O(1) lookup (exporters/onnx.py; checked for 16,397
# levels, while at 24,000 float32 rounding puts two boundaries in one cell), beyond it ONNX would compare every
# element with every boundary (tens of gigabytes per batch).
SOFTMAX_LEVELS = ("dense", "fire")
DENSE_TOP = 2 ** 14 + 16


def if_neuron(x: torch.Tensor, theta: float, v0: torch.Tensor | float = 0.0) -> torch.Tensor:
    """Integrate-and-fire with soft reset over T steps; returns the mean output rate.

    ``x`` has the time axis first (T, ...). Per step:
    h(t) = v(t-1) + x(t);  o(t) = θ·H(h(t) − θ);  v(t) = h(t) − o(t);  H(0) = 1.
    Result: ō = (1/T) Σ_t o(t).
    """
    v = torch.as_tensor(v0, dtype=x.dtype).expand_as(x[0]).clone()
    total = torch.zeros_like(x[0])
    for xt in x:
        h = v + xt
        o = theta * (h >= theta).to(x.dtype)
        v = h - o
        total = total + o
    return total / x.shape[0]


def mtn(h: torch.Tensor, theta_m: float, n: int) -> torch.Tensor:
    """Multi-threshold neuron, one timestep: o = θ_M · clip(floor(h / θ_M), 0, N)."""
    return theta_m * torch.clamp(torch.floor(h / theta_m), 0, n)


def dual_if(x: torch.Tensor, theta_pos: float, theta_neg: float,
            v0_pos: float = 0.0, v0_neg: float = 0.0) -> torch.Tensor:
    """Dual IF for signed input: a positive branch on max(0, x) and a negative on −min(0, x)."""
    pos = if_neuron(torch.clamp(x, min=0), theta_pos, v0_pos)
    neg = if_neuron(torch.clamp(-x, min=0), theta_neg, v0_neg)
    return pos - neg


def dual_mtn(x_mean: torch.Tensor, theta_pos: float, theta_neg: float, n: int,
             v0_pos: float = 0.0, v0_neg: float = 0.0) -> torch.Tensor:
    """Dual MTN at one step; ``x_mean`` is the time-averaged input, v0 the MTN's own start potential."""
    pos = mtn(torch.clamp(x_mean, min=0) + v0_pos, theta_pos, n)
    neg = mtn(torch.clamp(-x_mean, min=0) + v0_neg, theta_neg, n)
    return pos - neg


def fire_levels(m: int, fire: str = "sformer") -> list[int]:
    """Integer output levels y_1 < ... < y_2M of one polarity.

    sformer:     y_k = k (k ≤ M), y_k = M − 1 + 2^(k−M) (M < k ≤ 2M) — dense near zero, wide in the tail
    linear:      y_k = k, k = 1..2M
    exponential: y_k = 2^(k−1), k = 1..2M
    """
    if m < 1:
        raise ValueError(f"levels M must be >= 1, got {m}")
    if fire == "sformer":
        return [k for k in range(1, m + 1)] + [m - 1 + 2 ** (k - m) for k in range(m + 1, 2 * m + 1)]
    if fire == "linear":
        return list(range(1, 2 * m + 1))
    if fire == "exponential":
        return [2 ** (k - 1) for k in range(1, 2 * m + 1)]
    raise ValueError(f"unknown fire function {fire!r}; choose one of {', '.join(FIRE_FUNCTIONS)}")


def linear_levels(m: int, fire: str) -> int:
    """How many of the fire function's levels run 1, 2, 3, … without a gap (0 for M < 1): the range that
    a step λθ resolves before the coarser tail (sformer M: M + 1; linear M: 2M)."""
    y = fire_levels(m, fire) if m >= 1 else []
    return next((k for k, v in enumerate(y) if v != k + 1), len(y))


def post_softmax_levels(levels: list[int], mode: str = "dense") -> list[int]:
    """Levels of a post-softmax neuron from its fire function's levels (:data:`SOFTMAX_LEVELS`).

    Its step o_max / y_N puts almost every attention weight into the fire function's exponential tail, where
    levels are 2× apart and the paper's y − 1/2 boundaries round down: on the bundled MNIST ViT at λ 0.15 that
    alone cost 1.15 of its 1.15 points (docs/benchmarks.md, "Post-softmax levels")."""
    if mode not in SOFTMAX_LEVELS:
        raise ValueError(f"unknown post-softmax levels {mode!r}; choose one of {', '.join(SOFTMAX_LEVELS)}")
    top = max(levels)
    if mode == "dense" and top <= DENSE_TOP:
        return list(range(1, top + 1))
    return list(levels)


def site_levels(m: int, fire: str, kind: str, softmax_levels: str = "dense") -> list[int]:
    """The levels of a site of ``kind`` ("dual" or "softmax"): the fire function's, post-softmax ones by
    :func:`post_softmax_levels`."""
    y = fire_levels(m, fire)
    return post_softmax_levels(y, softmax_levels) if kind == "softmax" else y


def boundaries(levels: list[int], rounding: str = "paper") -> list[float]:
    """Firing boundaries in units of the step λθ: input u ≥ b_i reaches level y_i.

    paper:   b_i = y_i − 1/2 (the paper's eq. 11; initial potential λθ/2)
    nearest: b_i = (y_{i−1} + y_i)/2 with y_0 = 0 (rounds to the nearest level)
    floor:   b_i = y_i (initial potential 0: the multi-threshold neuron floor(h/θ_M) and the IF neuron)
    """
    if rounding == "paper":
        return [y - 0.5 for y in levels]
    if rounding == "floor":
        return [float(y) for y in levels]
    if rounding == "nearest":
        prev = [0] + list(levels[:-1])
        return [(a + b) / 2 for a, b in zip(prev, levels, strict=True)]
    raise ValueError(f"unknown rounding {rounding!r}; choose one of {', '.join(ROUNDINGS)}")


def crossings(x: torch.Tensor, bounds_pos: torch.Tensor, bounds_neg: torch.Tensor):
    """(k⁺, k⁻): how many boundaries the positive branch (x ≥ b, H(0) = 1) and the negative branch
    (−x ≥ b) cross; k⁻ is None when ``bounds_neg`` is empty (one-sided neuron)."""
    x = x.contiguous()
    kp = torch.bucketize(x, bounds_pos, right=True)
    return kp, torch.bucketize(-x, bounds_neg, right=True) if bounds_neg.numel() else None


def sfn_level(x: torch.Tensor, bounds_pos: torch.Tensor, bounds_neg: torch.Tensor,
              table_pos: torch.Tensor, table_neg: torch.Tensor) -> torch.Tensor:
    """Signed integer spike level of a dual SFN.

    ``bounds_*`` are the absolute firing boundaries (ascending, in input units);
    ``table_*`` the level reached after crossing k boundaries (table[0] = 0).
    The positive branch fires at x ≥ bound (H(0) = 1); the negative branch at −x ≥ bound.
    An empty bound vector disables that branch.
    """
    kp, kn = crossings(x, bounds_pos, bounds_neg)
    level = table_pos[kp]
    if kn is not None:
        level = level - table_neg[kn]
    return level


# ---------------------------------------------------------------- the fire rule of an IR neuron node

def spike_index(node, x: torch.Tensor) -> torch.Tensor:
    """Signed number of firing boundaries crossed (k⁺ − k⁻): the level is table[|k|] with k's sign.

    Both branches cannot fire at once (all boundaries are positive), so the difference is exact.
    """
    kp, kn = crossings(x, node.params["bounds_pos"], node.params["bounds_neg"])
    return kp if kn is None else kp - kn


def signed_table(node) -> torch.Tensor:
    """Level of each signed index −N..N, at position index + N."""
    t = node.params["table"]
    return torch.cat([-t.flip(0)[:-1], t])


def spike_levels(node, x: torch.Tensor) -> torch.Tensor:
    """Signed integer spike level of a neuron node for input x (see ir.py for the rule)."""
    n = node.params["table"].numel() - 1
    return signed_table(node)[spike_index(node, x) + n]


def level_values(node, level: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """o = level · λθ⁺ for level ≥ 0 and level · λθ⁻ below."""
    steps = node.params["steps"].to(dtype)
    lv = level.to(dtype)
    if node.params["bounds_neg"].numel():
        return torch.where(level >= 0, lv * steps[0], lv * steps[1])
    return lv * steps[0]


class NodeCache:
    """Values derived from a node's params, kept while the node lives (keyed on the node's identity,
    dropped when it is collected) and rebuilt when any tensor they were derived from was replaced
    (``passes.configure`` assigns new tensors) or their number changed. An entry holds those tensors, so their ids
    stay unique."""

    def __init__(self):
        self._entries: dict[int, dict] = {}

    def get(self, node, tag, sources: tuple, build: Callable):
        per_node = self._entries.get(id(node))
        if per_node is None:
            per_node = self._entries[id(node)] = {}
            weakref.finalize(node, self._entries.pop, id(node), None)
        hit = per_node.get(tag)
        if hit is not None and len(hit[0]) == len(sources) and all(
                a is b for a, b in zip(hit[0], sources, strict=True)):
            return hit[1]
        value = build()
        per_node[tag] = (sources, value)
        return value

    def clear(self) -> None:
        self._entries.clear()


NODE_CACHE = NodeCache()


def level_table(node, dtype=torch.float32) -> torch.Tensor:
    """level_values of every signed index (at position index + N), cached per node and dtype."""
    p = node.params
    return NODE_CACHE.get(node, ("levels", dtype), (p["table"], p["steps"], p["bounds_neg"]),
                          lambda: level_values(node, signed_table(node), dtype).contiguous())


def fire(node, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(output value, position) of a neuron node: position = signed index + N (int32, ≥ 0), the
    output one lookup in :func:`level_table`, so it is bit-identical to level_values(spike_levels(x)).

    This is the reference (bucketize); the simulators' :func:`sfn_deploy.simulators.firegrid.fire`
    gives the same bits in constant time per element."""
    n = node.params["table"].numel() - 1
    pos = (spike_index(node, x) + n).to(torch.int32)
    values = level_table(node, x.dtype)
    return torch.index_select(values, 0, pos.reshape(-1)).view(pos.shape), pos


def sfn(x: torch.Tensor, step_pos: float, step_neg: float, levels: list[int],
        rounding: str = "paper") -> torch.Tensor:
    """Scale-and-Fire neuron at one step: o = λθ⁺·G(x) for x ≥ 0, −λθ⁻·G(−x) below.

    ``step_pos`` = λθ⁺ and ``step_neg`` = λθ⁻ (0 disables the negative branch).
    """
    b = boundaries(levels, rounding)
    table = torch.tensor([0] + list(levels), dtype=torch.int64)
    bp = torch.tensor([step_pos * v for v in b], dtype=x.dtype)
    bn = torch.tensor([step_neg * v for v in b] if step_neg > 0 else [], dtype=x.dtype)
    lv = sfn_level(x, bp, bn, table, table)
    return torch.where(lv >= 0, lv.to(x.dtype) * step_pos, lv.to(x.dtype) * step_neg)


def softmax_step(o_max: float, levels: list[int]) -> float:
    """Step λθ_softmax of a post-softmax SFN: θ = o_max / (λ·y_N), so λθ = o_max / y_N.

    The top level then reproduces the largest softmax output seen in calibration;
    the step does not depend on λ.
    """
    return o_max / max(levels)
