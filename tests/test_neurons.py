"""Tests of the neuron mathematics (SPEC §4) in ``sfn_deploy.neurons``.

Everything conversion-theoretic here is checked *exactly* (``torch.equal``): inputs, weights, thresholds and
potentials live on dyadic grids (multiples of 2^-k, T a power of two) in float64, so every sum, mean and
``h / θ_M`` the neurons compute is exact and a failure is a real mathematical mismatch, not rounding.

Facts established by experiment while writing these tests (see the individual docstrings):

* Theorem 1 holds exactly with the MTN's start potential *divided by T* (input ``mean(x) + v(0)/T``);
  without the division (or without v(0) at all) it fails.
* Theorem 1 as stated ("v(0) ∈ [0, θ]", "N ≥ T+1") has one exception: v(0) = θ together with x(t) = θ for every t.
  The IF then fires every step (rate θ) but ``floor((Σx + v(0))/θ) = T+1``, so an MTN with N ≥ T+1 outputs
  (T+1)θ/T. With v(0) ∈ [0, θ) the theorem holds for every N ≥ T (N ≥ T+1 is not needed); with N = T exactly
  it holds on the closed interval v(0) ∈ [0, θ] too.
* Theorem 3: with dual neurons, per-step |input| within the branch thresholds and start potentials
  v0± ∈ [0, θ±) (MTN gets v0±/T), |dual-MTN − dual-IF| < (θ⁺ + θ⁻)/T, strictly, and ≤ θ/T when θ⁺ = θ⁻ = θ.
  The bound max(θ⁺, θ⁻)/T is *not* enough for unequal thresholds (explicit counterexample below).
"""
from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sfn_deploy.neurons import (
    boundaries,
    dual_if,
    dual_mtn,
    fire_levels,
    if_neuron,
    mtn,
    sfn,
    sfn_level,
    softmax_step,
)

F64 = torch.float64
HYP = settings(max_examples=200, deadline=None)
HYP_SFN = settings(max_examples=100, deadline=None)   # float-list properties: cheaper per check, costlier to draw


# ----------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------

def if_spikes(x: torch.Tensor, theta: float, v0: torch.Tensor | float = 0.0) -> torch.Tensor:
    """Independent reference IF (soft reset, H(0)=1) that returns the spike train o(t), shape like ``x``.

    Written from SPEC §4, not from neurons.py; its mean is checked against ``if_neuron`` wherever it is used.
    """
    v = torch.as_tensor(v0, dtype=x.dtype).expand_as(x[0]).clone()
    out = []
    for xt in x:
        h = v + xt
        o = torch.where(h >= theta, torch.full_like(h, theta), torch.zeros_like(h))
        v = h - o
        out.append(o)
    return torch.stack(out)


def mtn_of_if(x: torch.Tensor, theta: float, v0, n: int) -> torch.Tensor:
    """The single-step MTN that Theorem 1 pairs with an IF over T = len(x) steps."""
    t = x.shape[0]
    return mtn(x.mean(0) + torch.as_tensor(v0, dtype=x.dtype) / t, theta / t, n)


def all_sequences(grid: list[float], t: int) -> torch.Tensor:
    """Every length-t sequence over ``grid`` as a (t, len(grid)**t) float64 tensor (time first)."""
    return torch.tensor(list(itertools.product(grid, repeat=t)), dtype=F64).T.contiguous()


# ----------------------------------------------------------------------------------------------------------------
# Theorem 1
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("theta", [1.0, 0.5, 4.0])
@pytest.mark.parametrize("t,k", [(1, 3), (2, 3), (4, 2), (8, 1)])
def test_theorem1_exhaustive_on_dyadic_grid(theta, t, k):
    """Theorem 1 on *every* input sequence of a dyadic grid (steps θ/2^k) and every grid v(0) in [0, θ).

    Claim checked: ō_IF == MTN(mean(x) + v(0)/T; θ_M = θ/T, N) exactly, for N = T+1 and larger N
    (and for N = T, which is also sufficient when v(0) < θ).
    """
    grid = [i * theta / 2 ** k for i in range(2 ** k + 1)]          # [0, θ] inclusive
    x = all_sequences(grid, t)                                        # (T, B)
    for v0 in grid[:-1]:                                              # v(0) ∈ [0, θ)
        rate = if_neuron(x, theta, v0)
        # the reference spike train agrees with the module's IF
        assert torch.equal(if_spikes(x, theta, v0).mean(0), rate)
        for n in (t, t + 1, t + 2, 2 * t + 5):
            assert torch.equal(mtn_of_if(x, theta, v0, n), rate), (t, v0, n)


@pytest.mark.parametrize("t", [1, 2, 4, 8])
def test_theorem1_closed_interval_corner_case(t):
    """v(0) = θ (allowed by the theorem's closed interval [0, θ]) is exact except for one input sequence.

    With v(0) = θ and x(t) = θ for all t the IF fires every step (ō = θ), while Σx + v(0) = (T+1)θ, so an
    MTN with N ≥ T+1 outputs (T+1)θ/T. Clipping at N = T repairs it. Every other sequence is exact.
    """
    theta, k = 1.0, (2 if t <= 4 else 1)
    grid = [i * theta / 2 ** k for i in range(2 ** k + 1)]
    x = all_sequences(grid, t)
    rate = if_neuron(x, theta, theta)
    corner = (x == theta).all(0)
    assert corner.sum() == 1
    for n in (t + 1, t + 3):
        got = mtn_of_if(x, theta, theta, n)
        assert torch.equal(got[~corner], rate[~corner])
        assert rate[corner].item() == theta
        assert got[corner].item() == (t + 1) * theta / t           # the single counterexample
    # N = T: exact on the closed interval, corner included
    assert torch.equal(mtn_of_if(x, theta, theta, t), rate)


def test_theorem1_start_potential_convention():
    """The MTN's start potential must be v(0)/T (added to the mean input); v(0) undivided or dropped is wrong."""
    theta, t = 1.0, 4
    x = torch.tensor([0.5, 0.25, 0.0, 0.0], dtype=F64)
    v0 = 0.5
    # IF: h = 1.0 -> spike, then 0.25, 0.25, 0.25 -> one spike in all: rate 1/4
    assert if_neuron(x, theta, v0).item() == 0.25
    assert mtn(x.mean() + v0 / t, theta / t, t + 1).item() == 0.25          # v(0)/T: exact
    assert mtn(x.mean() + v0, theta / t, t + 1).item() == 0.5               # v(0): wrong
    assert mtn(x.mean(), theta / t, t + 1).item() == 0.0                    # no v(0): wrong


def test_theorem1_needs_enough_levels():
    """The clip at N matters: with N < T a constant input θ (IF rate θ) is under-reported."""
    theta, t = 1.0, 8
    x = torch.full((t,), theta, dtype=F64)
    assert if_neuron(x, theta).item() == theta
    assert mtn_of_if(x, theta, 0.0, t).item() == theta
    assert mtn_of_if(x, theta, 0.0, t - 1).item() == (t - 1) * theta / t


@st.composite
def if_case(draw):
    theta = draw(st.sampled_from([0.25, 0.5, 1.0, 2.0, 0.75, 1.5]))
    t = draw(st.sampled_from([1, 2, 4, 8, 16]))
    k = draw(st.integers(0, 6))
    b = draw(st.integers(1, 4))
    xs = draw(st.lists(st.integers(0, 2 ** k), min_size=t * b, max_size=t * b))
    v0 = draw(st.lists(st.integers(0, 2 ** k - 1), min_size=b, max_size=b)) if k else [0] * b
    extra = draw(st.integers(1, 8))
    x = torch.tensor(xs, dtype=F64).reshape(t, b) * (theta / 2 ** k)
    v = torch.tensor(v0, dtype=F64) * (theta / 2 ** k)
    return theta, t, x, v, t + extra


@HYP
@given(if_case())
def test_theorem1_property(case):
    """Random dyadic input sequences in [0, θ], v(0) in [0, θ), N ≥ T+1: the MTN reproduces the IF rate exactly."""
    theta, t, x, v0, n = case
    rate = if_neuron(x, theta, v0)
    assert torch.equal(mtn(x.mean(0) + v0 / t, theta / t, n), rate)
    # and the rate is what the spike count says: θ/T · floor((Σx + v0)/θ)
    assert torch.equal(rate, theta / t * torch.floor((x.sum(0) + v0) / theta))


# ----------------------------------------------------------------------------------------------------------------
# Theorem 2: network level
# ----------------------------------------------------------------------------------------------------------------

def _two_layer(a, w1, b1, th1, v1, w2, b2, th2, v2):
    """Run the same 2-layer net as IF-over-T and as single-step MTNs. ``a`` is (T, B, I)."""
    t = a.shape[0]
    # SNN of IF neurons, spike by spike
    x1 = a @ w1.T + b1                                     # (T, B, H)
    s1 = if_spikes(x1, th1, v1)
    assert torch.equal(s1.mean(0), if_neuron(x1, th1, v1))
    x2 = s1 @ w2.T + b2                                    # (T, B, O)
    assert x1.min() >= 0 and x1.max() <= th1 and x2.min() >= 0 and x2.max() <= th2   # Theorem 1's premises
    snn = if_neuron(x2, th2, v2)
    # the same net with one-step MTNs; linear maps applied to the means
    o1 = mtn(a.mean(0) @ w1.T + b1 + v1 / t, th1 / t, t + 1)
    o2 = mtn(o1 @ w2.T + b2 + v2 / t, th2 / t, t + 1)
    return snn, o2


def test_theorem2_fixed_network():
    """A hand-built 3→4→2 net with non-negative dyadic weights whose layer inputs stay in [0, θ]."""
    torch.manual_seed(0)
    t = 8
    a = torch.randint(0, 9, (t, 5, 3), dtype=torch.int64).to(F64) / 8          # inputs in [0, 1]
    w1 = torch.tensor([[0.25, 0.25, 0.125], [0.5, 0.0, 0.25], [0.125, 0.125, 0.125], [0.0, 0.75, 0.0]], dtype=F64)
    b1 = torch.tensor([0.25, 0.125, 0.5, 0.25], dtype=F64)                    # row sums + bias <= θ1 = 1
    w2 = torch.tensor([[0.0625, 0.125, 0.0, 0.125], [0.125, 0.0625, 0.125, 0.0]], dtype=F64)
    b2 = torch.tensor([0.125, 0.0625], dtype=F64)                             # θ1·row sum + bias <= θ2 = 0.5
    v1 = torch.tensor([0.0, 0.5, 0.25, 0.75], dtype=F64)
    v2 = torch.tensor([0.25, 0.0], dtype=F64)
    snn, mtn_net = _two_layer(a, w1, b1, 1.0, v1, w2, b2, 0.5, v2)
    assert torch.equal(snn, mtn_net)
    assert snn.abs().sum() > 0                                                # not trivially all zero


@st.composite
def net_case(draw):
    t = draw(st.sampled_from([1, 2, 4, 8, 16]))
    th1 = draw(st.sampled_from([0.5, 1.0, 2.0]))
    th2 = draw(st.sampled_from([0.25, 0.5, 1.0]))
    k = 4
    n_in, n_hid, n_out, batch = 4, 4, 2, draw(st.integers(1, 2))

    def ints(n, hi):
        return torch.tensor(draw(st.lists(st.integers(0, hi), min_size=n, max_size=n)), dtype=F64)

    # the input spike-rate sequence is long, so its contents come from a drawn seed (cheaper than a drawn list)
    g = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 31 - 1)))
    a = torch.randint(0, 2 ** k + 1, (t, batch, n_in), generator=g).to(F64) / 2 ** k  # [0, 1]
    # each of 4 weights ≤ th1/8 so a row sum ≤ th1/2; bias ≤ th1/2  ->  x1 ∈ [0, th1]
    w1 = ints(n_hid * n_in, 2 ** k).reshape(n_hid, n_in) * (th1 / 8 / 2 ** k)
    b1 = ints(n_hid, 2 ** k) * (th1 / 2 / 2 ** k)
    # spikes are 0 or th1; each weight ≤ th2/(8 th1) so th1·row sum ≤ th2/2; bias ≤ th2/2  ->  x2 ∈ [0, th2]
    w2 = ints(n_out * n_hid, 2 ** k).reshape(n_out, n_hid) * (th2 / th1 / 8 / 2 ** k)
    b2 = ints(n_out, 2 ** k) * (th2 / 2 / 2 ** k)
    v1 = ints(n_hid, 2 ** k - 1) * (th1 / 2 ** k)
    v2 = ints(n_out, 2 ** k - 1) * (th2 / 2 ** k)
    return a, w1, b1, th1, v1, w2, b2, th2, v2


@HYP
@given(net_case())
def test_theorem2_property(case):
    """Random 4→4→2 nets (non-negative dyadic weights, inputs kept in [0, θ]): IF-SNN over T == MTN-SNN, exactly."""
    snn, mtn_net = _two_layer(*case)
    assert torch.equal(snn, mtn_net)


# ----------------------------------------------------------------------------------------------------------------
# Theorem 3: signed inputs, dual neurons
# ----------------------------------------------------------------------------------------------------------------
#
# Derivation of the bound verified below. Let v0± ∈ [0, θ±) be the branch start potentials (the MTN branches get
# v0±/T), every x(t) ∈ [−θ⁻, θ⁺], a = Σ max(0,x)/θ⁺, b = Σ max(0,−x)/θ⁻, γ± = v0±/θ±, ρ = θ⁻/θ⁺. By Theorem 1
# per branch, T·dual_IF = θ⁺⌊a + γ⁺⌋ − θ⁻⌊b + γ⁻⌋. If mean(x) ≥ 0 the MTN's negative branch is silent and
#     T·(dual_MTN − dual_IF)/θ⁺ = ⌊a − ρb + γ⁺⌋ − ⌊a + γ⁺⌋ + ρ⌊b + γ⁻⌋ ∈ (−1 − ρ + ργ⁻, 1 + ργ⁻),
# i.e. −(θ⁺ + θ⁻ − v0⁻)/T < error < (θ⁺ + v0⁻)/T, and mirrored for mean(x) < 0:
#     −(θ⁻ + v0⁺)/T < error < (θ⁺ + θ⁻ − v0⁺)/T.
# Hence always |error| < (θ⁺ + θ⁻)/T. (The upper side is the paper's (|C_v| + θ^±)/T with C_v = the other
# branch's start potential.) When θ⁺ = θ⁻ = θ (ρ = 1) the quantity above is an integer in (−2, 2), so the error is
# in {−θ/T, 0, θ/T}: |error| ≤ θ/T, and that is attained. For unequal thresholds max(θ⁺, θ⁻)/T is exceeded
# (test_theorem3_unequal_thresholds_exceed_max below), so the sum is the bound to test.


def test_theorem3_equal_thresholds_bound_is_attained():
    """θ⁺ = θ⁻ = 1, T = 2, x = (1, −0.625): dual-IF 0.5, dual-MTN 0: error exactly θ/T."""
    x = torch.tensor([1.0, -0.625], dtype=F64)
    assert dual_if(x, 1.0, 1.0).item() == 0.5
    assert dual_mtn(x.mean(), 0.5, 0.5, 3).item() == 0.0


def test_theorem3_unequal_thresholds_exceed_max():
    """θ⁺ = 1, θ⁻ = 0.75, T = 8: error 1.5/T > max(θ⁺, θ⁻)/T, but < (θ⁺ + θ⁻)/T.

    Positive spikes: Σ = 3 -> 3 spikes; negative: Σ = 2.0625 = 2.75 θ⁻ -> 2 spikes; dual-IF = (3 − 1.5)/8.
    The net mean 0.9375/8 is below θ⁺/T, so the dual-MTN outputs 0.
    """
    t = 8
    x = torch.tensor([1, 1, 1, -0.75, -0.75, -0.5625, 0, 0], dtype=F64)
    d = dual_if(x, 1.0, 0.75)
    m = dual_mtn(x.mean(), 1.0 / t, 0.75 / t, t + 1)
    assert d.item() == 1.5 / t and m.item() == 0.0
    assert abs((m - d).item()) > max(1.0, 0.75) / t
    assert abs((m - d).item()) < (1.0 + 0.75) / t


@st.composite
def dual_case(draw):
    tp = draw(st.sampled_from([0.25, 0.5, 1.0, 2.0, 0.75, 1.5]))
    tn = draw(st.one_of(st.just(tp), st.sampled_from([0.25, 0.5, 1.0, 2.0, 0.75, 1.5])))
    t = draw(st.sampled_from([1, 2, 4, 8, 16]))
    k = draw(st.integers(1, 5))
    b = draw(st.integers(1, 4))
    mags = torch.tensor(draw(st.lists(st.integers(0, 2 ** k), min_size=t * b, max_size=t * b)), dtype=F64)
    neg = torch.tensor(draw(st.lists(st.booleans(), min_size=t * b, max_size=t * b)))
    x = torch.where(neg, -mags * (tn / 2 ** k), mags * (tp / 2 ** k)).reshape(t, b)
    if draw(st.booleans()):
        vp = draw(st.integers(0, 2 ** k - 1)) * tp / 2 ** k
        vn = draw(st.integers(0, 2 ** k - 1)) * tn / 2 ** k
    else:
        vp = vn = 0.0
    return tp, tn, t, x, vp, vn


@HYP
@given(dual_case())
def test_theorem3_property(case):
    """Random signed dyadic sequences: the error obeys the two-sided bounds derived above."""
    tp, tn, t, x, vp, vn = case
    d = dual_if(x, tp, tn, vp, vn)
    m = dual_mtn(x.mean(0), tp / t, tn / t, t + 1, vp / t, vn / t)
    err = m - d
    nonneg = x.mean(0) >= 0
    lo = torch.where(nonneg, torch.full_like(err, -(tp + tn - vn) / t), torch.full_like(err, -(tn + vp) / t))
    hi = torch.where(nonneg, torch.full_like(err, (tp + vn) / t), torch.full_like(err, (tp + tn - vp) / t))
    assert (err > lo).all() and (err < hi).all(), (x, err)
    assert (err.abs() < (tp + tn) / t).all()
    if tp == tn:
        assert (err.abs() <= tp / t).all()
        assert torch.isin(err * t / tp, torch.tensor([-1.0, 0.0, 1.0], dtype=F64)).all()


def test_theorem3_unsigned_input_is_theorem1():
    """With non-negative inputs the dual neurons reduce to Theorem 1: exact, no error at all."""
    x = all_sequences([0.0, 0.25, 0.5, 0.75, 1.0], 4)
    assert torch.equal(dual_mtn(x.mean(0), 0.25, 0.5, 5), dual_if(x, 1.0, 2.0))
    xn = -2 * x                                      # negative branch with θ⁻ = 2, inputs in [−2, 0]
    assert torch.equal(dual_mtn(xn.mean(0), 0.25, 0.5, 5), dual_if(xn, 1.0, 2.0))


# ----------------------------------------------------------------------------------------------------------------
# fire functions
# ----------------------------------------------------------------------------------------------------------------

def test_sformer_levels_m8():
    assert fire_levels(8) == [1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 15, 23, 39, 71, 135, 263]
    assert fire_levels(8, "sformer") == fire_levels(8)


@pytest.mark.parametrize("m", range(1, 11))
@pytest.mark.parametrize("fire", ["sformer", "linear", "exponential"])
def test_levels_structure(m, fire):
    lv = fire_levels(m, fire)
    assert len(lv) == 2 * m
    assert all(isinstance(y, int) for y in lv)
    assert all(a < b for a, b in zip(lv, lv[1:], strict=False))   # strictly increasing
    assert lv[0] == 1
    if fire == "sformer":
        assert lv[:m] == list(range(1, m + 1))
        assert lv[m] == m + 1
        assert lv[-1] == m - 1 + 2 ** m
    elif fire == "linear":
        assert lv == list(range(1, 2 * m + 1))
    else:
        assert lv == [2 ** i for i in range(2 * m)]


def test_fire_levels_invalid():
    with pytest.raises(ValueError):
        fire_levels(8, "relu")
    with pytest.raises(ValueError):
        fire_levels(0)
    with pytest.raises(ValueError):
        fire_levels(-3, "linear")
    with pytest.raises(ValueError):
        boundaries([1, 2, 3], "ceil")
    assert boundaries([1, 2, 3], "floor") == [1.0, 2.0, 3.0]      # the IF / multi-threshold rule (methods)


def test_boundaries_rules():
    lv = fire_levels(3)                                            # [1, 2, 3, 4, 6, 10]
    assert lv == [1, 2, 3, 4, 6, 10]
    assert boundaries(lv) == [0.5, 1.5, 2.5, 3.5, 5.5, 9.5]
    assert boundaries(lv, "nearest") == [0.5, 1.5, 2.5, 3.5, 5.0, 8.0]
    # for evenly spaced levels the two rules coincide
    assert boundaries(fire_levels(5, "linear")) == boundaries(fire_levels(5, "linear"), "nearest")


# ----------------------------------------------------------------------------------------------------------------
# SFN
# ----------------------------------------------------------------------------------------------------------------

LEVEL_SETS = [("sformer", 8), ("sformer", 1), ("sformer", 3), ("linear", 4), ("exponential", 4)]
STEPS = [0.25, 0.1, 0.3 * 0.7, 3.0]


def _edges(levels, rounding):
    """(boundary in step units, level reached at it, level just below it)."""
    b = boundaries(levels, rounding)
    return [(bi, y, levels[i - 1] if i else 0) for i, (bi, y) in enumerate(zip(b, levels, strict=True))]


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("s", STEPS)
@pytest.mark.parametrize("fire,m", LEVEL_SETS)
@pytest.mark.parametrize("rounding", ["paper", "nearest"])
def test_sfn_boundaries_exact(fire, m, s, dtype, rounding):
    """On a boundary the higher level fires (H(0) = 1); the largest float below it gives the level below.

    paper rule: boundary s·(y_i − 1/2); nearest: s·(y_{i−1} + y_i)/2. Negative branch (step s⁻) mirrors it.
    """
    levels = fire_levels(m, fire)
    sn = s * 0.5
    for bi, y, below in _edges(levels, rounding):
        if rounding == "paper":
            assert bi == y - 0.5
        else:
            assert bi == (below + y) / 2
        xb = torch.tensor([s * bi], dtype=dtype)
        xlow = torch.nextafter(xb, torch.tensor([-math.inf], dtype=dtype))
        assert xlow < xb
        out = sfn(torch.cat([xb, xlow]), s, sn, levels, rounding)
        assert out.dtype == dtype
        assert torch.equal(out, torch.tensor([float(y), float(below)], dtype=dtype) * s), (bi, y, out)
        # negative branch: −s⁻·b gives −y; the float just above (smaller magnitude) gives −y_{i−1}
        nb = -torch.tensor([sn * bi], dtype=dtype)
        nhigh = torch.nextafter(nb, torch.tensor([math.inf], dtype=dtype))
        out = sfn(torch.cat([nb, nhigh]), s, sn, levels, rounding)
        assert torch.equal(out, torch.tensor([-float(y), -float(below)], dtype=dtype) * sn), (bi, y, out)
        # the integer level function agrees
        table = torch.tensor([0] + levels)
        bp = torch.tensor([s * v for v in boundaries(levels, rounding)], dtype=dtype)
        bn = torch.tensor([sn * v for v in boundaries(levels, rounding)], dtype=dtype)
        lv = sfn_level(torch.cat([xb, xlow, nb, nhigh]), bp, bn, table, table)
        assert lv.tolist() == [y, below, -y, -below]


@pytest.mark.parametrize("fire,m", LEVEL_SETS)
def test_sfn_saturation_and_zero(fire, m):
    levels = fire_levels(m, fire)
    s, sn = 0.25, 0.125
    top = levels[-1]
    x = torch.tensor([1e30, math.inf, s * (top - 0.5), 1e6 * s, 0.0, -0.0, -1e30, -math.inf, -sn * (top - 0.5)],
                     dtype=F64)
    assert sfn(x, s, sn, levels).tolist() == [top * s] * 4 + [0.0, 0.0] + [-top * sn] * 3
    # dead zone around zero: |x| < half a step (paper) gives 0
    z = torch.tensor([s / 2 * 0.999, -sn / 2 * 0.999, 1e-30, -1e-30], dtype=F64)
    assert sfn(z, s, sn, levels).tolist() == [0.0] * 4


@pytest.mark.parametrize("rounding", ["paper", "nearest"])
def test_sfn_negative_branch_disabled(rounding):
    levels = fire_levels(8)
    s = 0.25
    x = torch.tensor([-1e30, -1000.0, -s * 262.5, -s, -s / 2, -1e-300, -0.0, 0.0, s / 2, s], dtype=F64)
    out = sfn(x, s, 0.0, levels, rounding)
    assert out[:8].tolist() == [0.0] * 8
    assert out[8:].tolist() == [s, s]
    assert (out >= 0).all()
    # a disabled branch must not fire at all: a "−0 · step" spike would show as a negative zero
    assert not torch.signbit(out).any()


def test_paper_rule_is_not_nearest_for_uneven_levels():
    """SPEC §4: the paper's boundaries are not midpoints once levels are spaced unevenly (SFormer tail)."""
    levels = fire_levels(8)                      # ..., 9, 11, 15, ...
    s = 1.0
    x = torch.tensor([14.0, 13.0, 12.9], dtype=F64)
    assert sfn(x, s, s, levels, "paper").tolist() == [11.0, 11.0, 11.0]       # 15 needs x >= 14.5
    assert sfn(x, s, s, levels, "nearest").tolist() == [15.0, 15.0, 11.0]    # midpoint of 11 and 15 is 13


sfn_params = st.tuples(
    st.sampled_from(["sformer", "linear", "exponential"]),
    st.integers(1, 8),
    st.sampled_from([0.25, 0.1, 0.21, 1.0, 3.0]),
    st.sampled_from([0.0, 0.25, 0.07, 1.0]),
    st.sampled_from(["paper", "nearest"]),
)


@HYP_SFN
@given(sfn_params, st.lists(st.floats(-1e4, 1e4, allow_nan=False), min_size=1, max_size=25))
def test_sfn_monotone(params, xs):
    fire, m, s, sn, rounding = params
    levels = fire_levels(m, fire)
    x = torch.tensor(sorted(xs), dtype=F64)
    out = sfn(x, s, sn, levels, rounding)
    assert (out[1:] >= out[:-1]).all()
    # outputs are always one of the allowed values
    allowed = {0.0} | {float(torch.tensor(float(y), dtype=F64) * s) for y in levels}
    if sn > 0:
        allowed |= {float(torch.tensor(-float(y), dtype=F64) * sn) for y in levels}
    assert set(out.tolist()) <= allowed


@HYP_SFN
@given(st.integers(1, 8), st.sampled_from([0.25, 0.1, 0.21, 3.0]), st.sampled_from([0.25, 0.07, 1.0]),
       st.lists(st.floats(-1.0, 1.0, allow_nan=False), min_size=1, max_size=25))
def test_sfn_linear_error_at_most_half_step(m, s, sn, us):
    """Linear levels, x inside the non-saturated range [−s⁻(y_N + ½), s(y_N + ½)]: |sfn(x) − x| ≤ step/2."""
    levels = fire_levels(m, "linear")
    top = levels[-1] + 0.5
    x = torch.tensor([u * (s * top if u >= 0 else sn * top) for u in us], dtype=F64)
    out = sfn(x, s, sn, levels)
    half = torch.where(x >= 0, torch.full_like(x, s / 2), torch.full_like(x, sn / 2))
    assert ((out - x).abs() <= half * (1 + 1e-12)).all()


@HYP_SFN
@given(st.sampled_from(["sformer", "exponential", "linear"]), st.integers(1, 6), st.sampled_from([0.25, 0.1, 1.0]),
       st.lists(st.floats(0.0, 1.0, allow_nan=False), min_size=1, max_size=25))
def test_sfn_nearest_rounds_to_nearest_level(fire, m, s, us):
    """With rounding='nearest' the output is a closest level (0 included) for every x in [0, s·y_N]."""
    levels = fire_levels(m, fire)
    x = torch.tensor(us, dtype=F64) * (s * levels[-1])
    out = sfn(x, s, 0.0, levels, "nearest")
    cand = torch.tensor([0] + levels, dtype=F64) * s
    best = (cand[None, :] - x[:, None]).abs().min(1).values
    assert ((out - x).abs() <= best + 1e-12 * s * levels[-1]).all()


# ----------------------------------------------------------------------------------------------------------------
# post-softmax step
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("o_max", [1.0, 0.92, 0.5, 0.0035 * 263])
def test_softmax_step(o_max):
    levels = fire_levels(8)
    step = softmax_step(o_max, levels)
    assert step == o_max / 263
    # θ_softmax = o_max / (λ (M − 1 + 2^M)) gives λθ independent of λ
    for lam in (0.25, 0.5, 1.0):
        assert math.isclose(lam * (o_max / (lam * (8 - 1 + 2 ** 8))), step, rel_tol=1e-15)
    # the top level reproduces o_max, and o_max itself reaches the top level
    out = sfn(torch.tensor([o_max, 2 * o_max, o_max * 262 / 263], dtype=F64), step, 0.0, levels)
    assert math.isclose(out[0].item(), o_max, rel_tol=1e-15)
    assert out[0].item() == out[1].item() == 263 * step
    # the level below the top is 135 (boundary of 263 is 262.5 steps), not 262
    assert out[2].item() == 135 * step
