"""One sample's values in a batched tensor (sfn_deploy.samples): the rows that backends record per sample equal
what the network holds for that sample alone, for batch axes folded before or after the batch, or not first."""
import torch
from torch import nn

from sfn_deploy.convert import convert
from sfn_deploy.data import Dataset
from sfn_deploy.samples import Rows, regular
from sfn_deploy.simulators.interpreter import run_with_levels


class WindowsAndHeads(nn.Module):
    """Swin's window partition (windows folded in after the batch) and nn.MultiheadAttention (sequence-first:
    tokens folded in before the batch, and a batch axis that is not first)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.patch, self.win, self.win2 = nn.Conv2d(1, 8, 2, 2), nn.Linear(8, 8), nn.Linear(8, 8)
        self.enc = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True, norm_first=True)
        self.head = nn.Linear(8, 10)

    def forward(self, x):                                        # (B, 1, 8, 8)
        h = self.patch(x).permute(0, 2, 3, 1)                     # (B, 4, 4, 8)
        b = h.shape[0]
        w = h.reshape(b, 2, 2, 2, 2, 8).permute(0, 1, 3, 2, 4, 5).reshape(b * 4, 4, 8)     # 4 windows of 4
        w = self.win2(torch.relu(self.win(w))).reshape(b, 2, 2, 2, 2, 8).permute(0, 1, 3, 2, 4, 5).reshape(b, 16, 8)
        return self.head(self.enc(w).mean(1))


def test_rows_of_a_batch_are_each_sample_run_alone():
    m = WindowsAndHeads().eval()
    x = torch.randn(40, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    snn = convert(m, Dataset(x[:32], torch.zeros(32, dtype=torch.long), "random"), scale=0.3)
    irregular = [s.name for s in snn.graph.sites if not regular(s)]
    assert len(irregular) >= 4                                   # in windows, and q, k, v sequence-first
    _, batched = run_with_levels(snn.graph, x[32:])
    rows = Rows(snn.graph)
    naive_ok = set(irregular)
    for i in range(8):
        _, alone = run_with_levels(snn.graph, x[32 + i:33 + i])
        for name, v in alone.items():
            assert torch.equal(rows(name, batched[name])[i], v.reshape(-1)), name
            if name in naive_ok and not torch.equal(batched[name].reshape(8, -1)[i], v.reshape(-1)):
                naive_ok.discard(name)
    assert naive_ok == {"sfn_relu"}     # sample-major windows read as stored; the sequence-first sites do not


def test_nir_partial_levels_are_per_sample_rows():
    """The NIR backend's per-layer levels (partial export: a site inside an NIR region keeps its folded batch
    axis, here the windows) come back as the torch backend's per-sample rows."""
    from sfn_deploy.backends import get
    m = WindowsAndHeads().eval()
    x = torch.randn(40, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    snn = convert(m, Dataset(x[:32], torch.zeros(32, dtype=torch.long), "random"), scale=0.3)
    ref = get("torch").layers(snn, x[32:], 8)["levels"]
    got = get("nir").layers(snn, x[32:], 8)["levels"]
    irregular = {s.name for s in snn.graph.sites if not regular(s)}
    assert got and irregular & set(got)              # some folded or sequence-first sites are inside NIR regions
    for name, v in got.items():
        assert v.shape == ref[name].shape and (v == ref[name]).all(), name
