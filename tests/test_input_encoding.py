"""Input encoding (docs/concepts.md "Input encoding"): a neuron on the network input, firing above the calibration
images' minimum, so the first weight layers accumulate spikes instead of multiplying analog values."""
import pytest
import torch
import torch.nn as nn
from test_nir import assert_same, roundtrip

from sfn_deploy.convert import convert
from sfn_deploy.data import Dataset
from sfn_deploy.errors import UserError
from sfn_deploy.evaluation import measure
from sfn_deploy.exporters.nir import BACKEND
from sfn_deploy.simulators.interpreter import run, run_with_levels

BACKGROUND = -0.4242        # normalised MNIST's black


def images(n=256, size=8, seed=0):
    """Digit-like images: a constant negative background with brighter strokes, labels from the strokes."""
    g = torch.Generator().manual_seed(seed)
    x = torch.full((n, 1, size, size), BACKGROUND)
    mask = torch.rand(n, 1, size, size, generator=g) < 0.2
    x[mask] = torch.rand(int(mask.sum()), generator=g) * 3.0
    return Dataset(x, x.flatten(1)[:, :10].argmax(1), "strokes")


def mlp(size=8):
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(size * size, 32), nn.ReLU(), nn.Linear(32, 10)).eval()


def padded_cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 64, 10)).eval()


class TwoPaddings(nn.Module):
    """Two convolutions with different zero padding read the input: no one padding can move before the neuron."""
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(1, 4, 1)
        self.fc = nn.Linear(4 * 64, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.a(x) + self.b(x)).flatten(1))


def two_paddings():
    torch.manual_seed(0)
    return TwoPaddings().eval()


def _input_site(snn):
    return next((s for s in snn.sites if s.attrs["role"] == "input"), None)


def test_the_offset_keeps_the_network_and_the_background_fires_nothing():
    data, model = images(), mlp()
    snn = convert(model, data, scale=0.05, input_encoding="spikes")
    assert snn.config["input_encoding"] == "spikes"
    site = _input_site(snn)
    offset = snn.graph[site.inputs[0]]
    assert offset.op == "add" and offset.attrs["other"] == pytest.approx(-BACKGROUND)
    with torch.no_grad():           # the ANN reference is the source model: W·low is in the first bias
        torch.testing.assert_close(run(snn.graph, data.x, spiking=False), model(data.x), rtol=1e-5, atol=1e-5)
        _, levels = run_with_levels(snn.graph, data.x)
    background = data.x == BACKGROUND
    assert (levels[site.name][background] == 0).all() and (levels[site.name][~background] > 0).any()
    assert site.attrs["theta_neg"] == 0 and site.params["bounds_neg"].numel() == 0
    _, counter = measure(snn.graph, data)
    first = next(c for c in counter.result().layers if c.op == "linear")
    assert counter.result().mac_snn == 0 and first.ac > 0 and first.mac_ann == 64 * 32


def test_analog_input_is_unchanged():
    data = images()
    snn = convert(mlp(), data, scale=0.05, input_encoding="analog")
    assert _input_site(snn) is None and snn.config["input_encoding"] == "analog"
    _, counter = measure(snn.graph, data)
    assert counter.result().mac_snn == 64 * 32


def test_auto_encodes_where_the_input_layer_holds_a_tenth_of_the_macs_and_the_offset_folds():
    data = images()
    assert convert(mlp(), data, scale=0.1).config["input_encoding"] == "spikes"     # the default: auto
    # the same first layer before a layer 20× dearer: under a tenth of the MACs, the input stays analog
    torch.manual_seed(0)
    deep = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 1280), nn.ReLU(),
                         nn.Linear(1280, 10)).eval()
    assert convert(deep, data, scale=0.1, input_encoding="auto").config["input_encoding"] == "analog"
    # two paddings of the input: neither moves before the neuron, no exact fold, so analog
    assert convert(two_paddings(), data, scale=0.1, input_encoding="auto").config["input_encoding"] == "analog"
    # ... unless the darkest value is already 0: then there is nothing to fold
    shifted = Dataset(data.x - BACKGROUND, data.y, "strokes from 0")
    assert convert(two_paddings(), shifted, scale=0.1, input_encoding="auto").config["input_encoding"] == "spikes"


def test_a_padded_convolution_gets_its_padding_before_the_neuron(tmp_path):
    """Zero padding of x is padding of x − low by −low: it moves in front of the input neuron, the convolution
    reads it unpadded and takes W·low in its bias; the border fires its level in every image, the background
    inside none; NIR writes the offset and padding as the fan-out layer's bias and padding."""
    data, model = images(), padded_cnn()
    snn = convert(model, data, scale=0.1)
    assert snn.config["input_encoding"] == "spikes"
    site = _input_site(snn)
    pad = snn.graph[site.inputs[0]]
    assert pad.op == "pad" and pad.attrs["value"] == pytest.approx(-BACKGROUND) and pad.attrs["pad"] == [1, 1, 1, 1]
    conv = next(n for n in snn.graph if n.op == "conv2d")
    assert conv.attrs["padding"] == [0, 0] and site.shape[-2:] == [10, 10]
    with torch.no_grad():
        torch.testing.assert_close(run(snn.graph, data.x, spiking=False), model(data.x), rtol=1e-5, atol=1e-5)
        _, levels = run_with_levels(snn.graph, data.x)
    inner = levels[site.name][:, :, 1:-1, 1:-1]
    assert (inner[data.x == BACKGROUND] == 0).all()
    border = levels[site.name].clone()
    border[:, :, 1:-1, 1:-1] = 0
    assert (border.sum((1, 2, 3)) == border[0].sum()).all() and border[0].sum() > 0     # the same in every image
    info, got, ref, gl, rl = roundtrip(snn, tmp_path, data.x[:64])
    assert_same(got, ref, gl, rl)


def test_spikes_asked_for_without_an_exact_fold_have_no_offset():
    data, model = images(), two_paddings()
    snn = convert(model, data, scale=0.05, input_encoding="spikes")
    site = _input_site(snn)
    assert site is not None and snn.graph[site.inputs[0]].op == "input"
    assert site.attrs["theta_neg"] > 0                      # the background is a negative value to encode
    with torch.no_grad():
        torch.testing.assert_close(run(snn.graph, data.x, spiking=False), model(data.x), rtol=1e-5, atol=1e-5)


def test_only_the_sfn_method_and_weight_layer_readers_take_spikes():
    data = images()
    with pytest.raises(UserError, match="--method if"):
        convert(mlp(), data, method="if", input_encoding="spikes")
    torch.manual_seed(0)

    class Skip(nn.Module):      # the input also read by a residual sum: no neuron can stand in for it
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 10)

        def forward(self, x):
            return self.b(torch.relu(self.a(x)) + x)
    flat = Dataset(data.x.flatten(1)[:, :8], data.y, "rows")
    with pytest.raises(UserError, match="read by more than weight layers"):
        convert(Skip().eval(), flat, scale=0.1, input_encoding="spikes")
    assert convert(Skip().eval(), flat, scale=0.1, input_encoding="auto").config["input_encoding"] == "analog"


def test_nir_carries_the_offset_as_the_fan_out_bias(tmp_path):
    data = images()
    snn = convert(mlp(), data, scale=0.1, input_encoding="spikes")
    info, got, ref, gl, rl = roundtrip(snn, tmp_path, data.x[:64])
    assert_same(got, ref, gl, rl)
    assert info["sites"] == 2
    # the summary names what the input neuron's channels cost: the first layer, tiled by both sites' channels
    site, relu = _input_site(snn), next(s for s in snn.sites if s.attrs["role"] != "input")
    g_in, g_relu = (len(s.params["bounds_pos"]) + len(s.params["bounds_neg"]) for s in (site, relu))
    assert info["input_synapses"] == 64 * g_in * 32 * g_relu
    assert f"{info['input_synapses']:,} of them read the input neuron" in BACKEND.describe_export(info)
    analog = roundtrip(convert(mlp(), data, scale=0.1, input_encoding="analog"), tmp_path, data.x[:8])[0]
    assert analog["input_synapses"] == 0 and "input neuron" not in BACKEND.describe_export(analog)


def test_nir_partial_runs_the_offset_with_an_input_neuron_left_on_the_host(tmp_path):
    """A 4-axis input: its neuron cannot be written in NIR, so --partial leaves it to the host, and its offset
    with it (the first layer's bias keeps W·low); run back from the file, the network is the same."""
    from test_nir import _levels_from_channels

    from sfn_deploy.exporters import nir as nir_exp
    g = torch.Generator().manual_seed(0)
    x = torch.full((128, 2, 2, 4, 4), BACKGROUND)
    mask = torch.rand(x.shape, generator=g) < 0.3
    x[mask] = torch.rand(int(mask.sum()), generator=g) * 2
    snn = convert(mlp(), Dataset(x, torch.zeros(128, dtype=torch.long), "r"), scale=0.1, input_encoding="spikes")
    site = _input_site(snn)
    path = str(tmp_path / "p.nir")
    info = nir_exp.export_nir_partial(snn, path)
    assert [(h["name"], h["op"]) for h in info["host_nodes"]] == [(site.inputs[0], "add"), (site.name, "sfn")]
    got, spikes = nir_exp.run_partial(path, x, spikes=True)
    ref, levels = run_with_levels(snn.graph, x)
    assert (got - ref).abs().max().item() < 1e-5
    sites = {s.name: s for s in snn.sites}
    assert set(spikes) == set(levels) - {site.name}
    for k, v in spikes.items():
        assert torch.equal(_levels_from_channels(sites[k], v), levels[k]), k
