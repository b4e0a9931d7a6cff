"""Streaming calibration: bounded memory, quantiles within one bin of the exact ones."""
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sfn_deploy.calibrate import StreamingHistogram, top_percent


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10_000), st.floats(0.5, 0.999), st.integers(1, 8))
def test_quantile_within_one_bin_of_exact(seed, q, chunks):
    g = torch.Generator().manual_seed(seed)
    data = torch.rand(4000, generator=g, dtype=torch.float64) ** 3 * torch.rand(1, generator=g).item() * 50
    h = StreamingHistogram(bins=1024)
    for part in data.chunk(chunks):          # growing maxima force range doublings
        h.update(part.sort().values)
    # the exact quantile depends on the rank convention (torch: position (n − 1)·q, the histogram: rank q·n); in a
    # sparse tail those two order statistics can lie several bins apart, so the histogram's must fall within a
    # bin of the range between them
    s = data.sort().values
    lo, hi = s[int((len(s) - 1) * q)].item(), s[min(len(s) - 1, int(q * len(s)) + 1)].item()
    width = h.hi / h.bins
    assert lo - width - 1e-12 <= h.quantile(q) <= hi + width + 1e-12
    assert h.counts.numel() == 1024 and h.n == data.numel()


def test_doubling_merges_bins_exactly():
    a = StreamingHistogram(bins=8)
    a.update(torch.tensor([0.1, 0.9]))       # range starts at 0.9, doubles later
    a.update(torch.tensor([3.5]))
    assert a.hi >= 3.5 and a.counts.sum() == 3 and a.max == 3.5
    # the same samples binned directly on the final range give the same counts
    direct = torch.bincount((torch.tensor([0.1, 0.9, 3.5], dtype=torch.float64) / a.hi * 8).long(), minlength=8)
    assert torch.equal(a.counts, direct.double())


def test_top_percent():
    h = StreamingHistogram(bins=4096)
    h.update(torch.arange(1, 10001, dtype=torch.float64))
    assert top_percent(h, 0.0) == 10000
    assert abs(top_percent(h, 1.0) - 9900) <= 3


# ---------------------------------------------------------------- repeated values (docs/concepts.md)

import math  # noqa: E402
from itertools import pairwise  # noqa: E402

import pytest  # noqa: E402
import torch.nn as nn  # noqa: E402

from sfn_deploy.calibrate import RepeatedValues, calibrate  # noqa: E402
from sfn_deploy.capture import capture  # noqa: E402
from sfn_deploy.neurons import spike_levels  # noqa: E402
from sfn_deploy.passes import REPEATED_FLOOR, REPEATED_SHARE, configure, insert_sfn, repeated_caps, set_scale  # noqa: E402
from sfn_deploy.simulators.interpreter import Observer, run  # noqa: E402

BIAS = 0.3                                      # the first conv's pre-activation wherever its window sees only 0
GRID = [0.02 * 1.02 ** k for k in range(198)] + [1.0]      # the search's range [0.02, 1] in steps of 2 %


def test_repeated_values_keeps_each_channels_most_frequent_value_and_its_share():
    x = torch.randn(6, 3, 10, 10)
    x[:, 0, :5] = 0.25                          # channel 0: half its positions hold 0.25
    x[:3, 2, :, :8] = -1.5                      # channel 2: 0.8 of the positions of the first three samples
    r = RepeatedValues(keep=2, sample=64)       # a sample smaller than a batch's 300 values per channel
    for part in x.split(2):
        r.update(part)
    value, share = r.result()
    assert value[0] == 0.25 and abs(float(share[0]) - 0.5) < 1e-6
    assert value[2] == -1.5 and abs(float(share[2]) - 0.4) < 1e-6
    assert float(share[1]) <= 1 / 300 + 1e-6                  # random values: nothing repeats
    assert all(len(c) <= 2 for c in r.candidates)            # bounded memory


def _background_net() -> nn.Module:
    """conv 3×3 (weights 1/9, bias 0.3) → ReLU → linear: on images that are 0 outside a blob, the conv's
    pre-activation is exactly 0.3 at every position whose window misses the blob (zero padding included)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(1, 1, 3, padding=1)
    with torch.no_grad():
        conv.weight.fill_(1 / 9)
        conv.bias.fill_(BIAS)
    return nn.Sequential(conv, nn.ReLU(), nn.Flatten(), nn.Linear(144, 3)).eval()


def _blob_images(n: int = 64) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    x = torch.zeros(n, 1, 12, 12)
    x[:, :, 4:8, 4:8] = torch.rand(n, 1, 4, 4, generator=g) * 3
    return x


@pytest.fixture(scope="module")
def background():
    m, x = _background_net(), _blob_images()
    g = insert_sfn(capture(m, x[:2]))
    calibrate(g, [x[:32], x[32:]], quiet=True)
    return g, x


class _Grab(Observer):
    def __call__(self, event):
        if event.node.op == "sfn":
            self.x, self.out = event.args[0], event.out


def _background_output(g, x, lam: float) -> float:
    """The SNN site's output at a background position (a corner) under λ."""
    set_scale(g, lam)
    grab = _Grab()
    run(g, x[:1], hook=grab)
    assert float(grab.x[0, 0, 0, 0]) == pytest.approx(BIAS)
    return float(grab.out[0, 0, 0, 0])


def test_calibration_finds_the_repeated_value_and_its_share(background):
    g, x = background
    site = g.sites[0]
    v, share = float(site.params["mode_value"][0]), float(site.params["mode_share"][0])
    grab = _Grab()
    run(g, x, spiking=False, hook=grab)
    exact = float((grab.x == torch.tensor(BIAS)).float().mean())
    assert v == pytest.approx(BIAS) and share == pytest.approx(exact) and share > REPEATED_SHARE
    assert repeated_caps(site) == (pytest.approx(v), math.inf)
    assert v / site.attrs["theta_pos"] < 0.5           # so λθ passes 2v inside the search's range


def test_the_repeated_value_is_never_switched_off_and_is_exactly_a_level_once_the_step_reaches_it(background):
    g, x = background
    site = g.sites[0]
    theta = site.attrs["theta_pos"]
    v = torch.tensor(BIAS)
    for lam in GRID:
        set_scale(g, lam)
        step = float(site.params["steps"][0])
        level = int(spike_levels(site, v.reshape(1))[0])
        assert step == pytest.approx(min(lam * theta, BIAS), rel=1e-6)
        assert level >= 1                               # never rounded to zero at any λ
        if lam * theta >= BIAS:                         # the cap: one step is the value itself, level 1
            assert level == 1
            gap = float((site.params["bounds_pos"] - v).abs().min())
            assert gap >= 0.5 * step - 1e-6             # half a step from every boundary: the largest margin


def test_a_small_change_of_lambda_moves_the_background_and_the_spikes_a_little(background):
    g, x = background
    site = g.sites[0]
    outs = [_background_output(g, x, lam) for lam in GRID]
    jumps = [abs(b - a) for a, b in pairwise(outs)]
    assert max(jumps) <= 0.7 * BIAS                     # a step below the value (level k ≥ 2 → k − 1), never 0.3 → 0
    theta = site.attrs["theta_pos"]
    assert all(o == pytest.approx(BIAS) for o, lam in zip(outs, GRID, strict=True) if lam * theta >= BIAS)

    def spikes(lam):
        set_scale(g, lam)
        grab = _Grab()
        run(g, x, hook=grab)
        return float((grab.out / site.params["steps"][0]).round().sum())
    counts = [spikes(lam) for lam in GRID[::4]]        # λ 8 % apart
    assert max(abs(b - a) / a for a, b in pairwise(counts)) < 0.5


def test_without_the_rule_the_whole_background_switches_off_at_once(background):
    g, x = background
    site = g.sites[0]
    saved = {k: site.params.pop(k) for k in ("mode_value", "mode_share")}   # a graph from an earlier version
    try:
        theta = site.attrs["theta_pos"]
        just_below, just_above = 2 * BIAS / theta / 1.01, 2 * BIAS / theta * 1.01
        assert _background_output(g, x, just_below) == pytest.approx(just_below * theta, rel=1e-6)
        assert _background_output(g, x, just_above) == 0.0          # the cliff: a 2v jump at every position
        configure(site, 0.9)
        assert float(site.params["steps"][0]) == pytest.approx(0.9 * theta, rel=1e-6)
    finally:
        site.params.update(saved)
        configure(site, 1.0)


def _site(**attrs):
    from sfn_deploy.ir import Node
    a = {"kind": "dual", "fire": "sformer", "M": 8, "levels": list(range(1, 9)), "rounding": "paper", "lam": 1.0,
         "theta_pos": 2.0, "theta_neg": 1.0, "o_max": 0.0, "absorbs": None, **attrs}
    p = {"mode_value": torch.tensor([0.5, -0.4, 0.9, 0.01, -3.0]),
         "mode_share": torch.tensor([0.6, 0.3, 0.05, 0.9, 0.2])}
    return Node("s", "sfn", ["x"], a, p, [1, 5], 0)


def test_repeated_caps_count_only_shared_values_above_the_floor_per_branch():
    # 0.9 fills too few positions, 0.01 is below 2 % of θ⁺; −3.0 is the negative branch's largest
    assert REPEATED_FLOOR * 2.0 > 0.01 and REPEATED_SHARE > 0.05
    assert repeated_caps(_site()) == (pytest.approx(0.5), pytest.approx(3.0))
    s = configure(_site(), 0.5)
    assert s.params["steps"].tolist() == pytest.approx([0.5, 0.5])         # min(1.0, 0.5), min(0.5, 3.0)
    absorbed = configure(_site(absorbs="relu", theta_neg=0.0), 0.5)
    assert absorbed.params["steps"].tolist() == pytest.approx([0.5, 0.0])


@pytest.mark.parametrize("attrs", [{"method": "mtn", "T": 4}, {"kind": "softmax", "o_max": 1.0}])
def test_the_baselines_and_softmax_sites_keep_their_steps(attrs):
    assert repeated_caps(_site(**attrs)) == (math.inf, math.inf)
    s = configure(_site(**attrs), 0.5)
    if attrs.get("kind") != "softmax":
        assert s.params["steps"].tolist() == pytest.approx([1.0, 0.5])


def _mode_cases():
    torch.manual_seed(0)
    z = torch.zeros(3, 4096)
    z[0, :10], z[0, 10:] = -0.0, 1.0                     # a minority of −0: +0 is not the mode
    z[1, ::2] = -0.0                                     # both signs modal: torch's sort decides (fallback)
    nan = torch.randn(4, 4096)
    nan[2, 5] = float("nan")
    ties = torch.randint(-3, 3, (20, 4096)).float() * 0.5
    ties[ties == 0] = -0.0                               # only −0: the mode keeps its sign
    return [(torch.randn(384, 4096) * 4).round(), torch.randn(197, 4096), torch.relu(torch.randn(64, 4096)),
            torch.zeros(10, 4096), torch.randint(0, 3, (50, 4096)).float(), z, nan, ties,
            torch.arange(8192.0).view(2, 4096)]          # every value once: the smallest


def test_hashed_mode_is_torch_mode_bit_for_bit():
    """The native hash count (firegrid.mode_rows, through calibrate._mode) returns torch.mode's values, ties to
    the smallest, −0 and +0 as one value with torch's sign, and hands NaN rows and two-signed modal zeros to
    torch."""
    from simulators.firegrid import mode_rows, native
    assert native() is not None                          # (the suite's machines have a C compiler)
    from sfn_deploy.calibrate import _mode
    for s in _mode_cases():
        got, want = _mode(s), s.mode(dim=1).values
        assert torch.equal(got, want) and torch.equal(got.signbit(), want.signbit())
    assert mode_rows(_mode_cases()[4]) is not None            # the hash count ran (not torch's fallback)


def test_native_calibration_is_the_torch_ops_bit_for_bit(monkeypatch):
    """Histograms, θ and repeated values from the native kernels (signed histogram, equal counts, hashed mode)
    equal those of the torch ops (SFN_NATIVE=0), on sites with a repeated background, zeros of both signs and
    channels-last tokens, values on bin edges and a NaN."""
    from sfn_deploy.calibrate import RepeatedValues, update_signed
    torch.manual_seed(1)
    batches = [torch.relu(torch.randn(16, 8, 24, 24)).round(), (torch.randn(16, 8, 24, 24) * 2).round(),
               torch.randn(8, 197, 64) * 3, torch.cat([torch.arange(4096.0) / 512, -torch.arange(4096.0) / 256]),
               torch.tensor([float("nan"), 0.0, -0.0, 2.0] * 2048)]

    def calibrated():
        out = []
        for x in batches:
            pos, neg, rep = StreamingHistogram(), StreamingHistogram(), RepeatedValues()
            for chunk in (x, x * 1.5):
                update_signed(pos, neg, chunk)
                if x.dim() > 1:
                    rep.update(chunk)
            out.append((pos.counts, neg.counts, pos.n, neg.n, pos.hi, neg.hi, rep.candidates, rep.positions,
                        *rep.result()))
        return out
    native = calibrated()
    monkeypatch.setenv("SFN_NATIVE", "0")
    for a, b in zip(native, calibrated(), strict=True):
        for u, v in zip(a, b, strict=True):
            assert torch.equal(u, v) if isinstance(u, torch.Tensor) else u == v


def test_ranks_summed_with_a_branch_empty_everywhere():
    """The input neuron above the minimum has no negative value on any rank: summing its empty histogram ends
    (it looped for ever under torchrun) and leaves it empty."""
    import signal

    from sfn_deploy.calibrate import _sum_ranks
    pos, neg = StreamingHistogram(), StreamingHistogram()
    pos.update(torch.tensor([0.5, 1.5, 3.0]))
    signal.alarm(20)
    try:
        _sum_ranks({"s": pos}, {"s": neg}, {})
    finally:
        signal.alarm(0)
    assert neg.n == 0 and neg.hi == 0.0 and pos.n == 3
