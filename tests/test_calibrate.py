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
    exact = torch.quantile(data, q).item()
    width = h.hi / h.bins
    assert abs(h.quantile(q) - exact) <= 2 * width + 1e-12
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
