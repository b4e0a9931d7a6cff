"""NIR exporter (SPEC §7): standard NIR primitives only, run by nirtorch, same network as the torch reference.

Each SFN site becomes parallel strict ``nir.Threshold`` channels; the file is written with
``nir.write``, read back with ``nir.read`` and run by nirtorch's executor with our node map.
"""
import os

import nir
import numpy as np
import pytest
import torch
import torch.nn as nn

from sfn_deploy.convert import convert
from sfn_deploy.data import Dataset
from sfn_deploy.errors import UserError
from sfn_deploy.exporters import nir as nir_exp
from sfn_deploy.exporters.nir import export_nir, load_nir, to_nir
from sfn_deploy.ir import Graph, Node
from sfn_deploy.model_file import ConvertedModel
from sfn_deploy.runtime import run_with_levels

from conftest import MODELS


def nir_levels(module, graph: Graph, x):
    """Signed spike level of every site, rebuilt from the Threshold channel spikes inside the nirtorch module."""
    spikes = {}
    hooks = [m.register_forward_hook(lambda mod, i, o, name=name: spikes.__setitem__(name, o))
             for name, m in module.graph_module.named_children() if isinstance(m, nir_exp.Threshold)]
    out = module(x)
    for h in hooks:
        h.remove()
    levels = {}
    for site in graph.sites:
        n, m = site.params["bounds_pos"].numel(), site.params["bounds_neg"].numel()
        s = spikes[site.name].reshape(x.shape[0], n + m, -1)        # copy index outermost
        table = site.params["table"]
        lv = table[s[:, :n].sum(1).long()] - (table[s[:, n:].sum(1).long()] if m else 0)
        levels[site.name] = lv.reshape(x.shape[0], *site.shape[1:])
    return out, levels


def roundtrip(model: ConvertedModel, tmp_path, x):
    path = str(tmp_path / "m.nir")
    info = export_nir(model, path)
    module = load_nir(path)                              # nir.read + nirtorch.nir_to_torch
    got, got_levels = nir_levels(module, model.graph, x)
    ref, ref_levels = run_with_levels(model.graph, x)
    return info, got, ref, got_levels, ref_levels


def assert_same(got, ref, got_levels, ref_levels):
    assert set(got_levels) == set(ref_levels)
    for k in ref_levels:
        assert torch.equal(got_levels[k], ref_levels[k]), k
    assert (got - ref).abs().max().item() < 1e-4
    assert torch.equal(got.argmax(1), ref.argmax(1))


@pytest.fixture(scope="module")
def mlp_snn(digits_mlp, digits):
    return convert(digits_mlp, digits, scale=0.3)


@pytest.fixture(scope="module")
def cnn_snn(digits):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),
                      nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 10)).eval()
    return convert(m, digits.limit(200), scale=0.3)       # random weights, calibrated sites


def test_digits_mlp_roundtrip(mlp_snn, digits, tmp_path):
    info, got, ref, gl, rl = roundtrip(mlp_snn, tmp_path, digits.x)
    assert_same(got, ref, gl, rl)
    assert info["sites"] == 2 and info["bytes"] == os.path.getsize(info["path"]) > 0
    n_levels = [s.params["bounds_pos"].numel() + s.params["bounds_neg"].numel() for s in mlp_snn.sites]
    assert info["neurons_before"] == 64 + 32
    assert info["neurons_after"] == 64 * n_levels[0] + 32 * n_levels[1]
    assert info["synapses_before"] == 64 * 64 + 64 * 32 + 32 * 10
    assert info["synapses_after"] > info["synapses_before"]
    g = nir.read(info["path"])
    kinds = {type(v).__name__ for v in g.nodes.values()}
    assert kinds <= {"Input", "Output", "Affine", "Linear", "Flatten", "Threshold"} and "Threshold" in kinds


def test_cnn_without_max_pool_roundtrip(cnn_snn, tmp_path):
    assert [n.op for n in cnn_snn.graph].count("avg_pool2d") == 1 and len(cnn_snn.sites) == 2
    x = torch.rand(64, 1, 8, 8) * 16                      # digits pixel range
    info, got, ref, gl, rl = roundtrip(cnn_snn, tmp_path, x)
    assert_same(got, ref, gl, rl)
    kinds = {type(v).__name__ for v in nir.read(info["path"]).nodes.values()}
    assert {"Conv2d", "AvgPool2d", "Threshold", "Flatten"} <= kinds


def _site(name, inp, width, bpos, bneg, steps, table):
    return Node(name, "sfn", [inp], {"kind": "dual"}, {
        "bounds_pos": torch.tensor(bpos, dtype=torch.float32), "bounds_neg": torch.tensor(bneg, dtype=torch.float32),
        "steps": torch.tensor(steps, dtype=torch.float32), "table": torch.tensor(table)}, [1, width])


def test_inputs_exactly_on_a_boundary_fire(tmp_path):
    """NIR Threshold is strict (v > θ): the exporter's θ = nextafter(b, −inf) makes x = b fire, as in the SFN."""
    bpos, bneg = [0.3, 0.7, 1.9, 5.1], [0.2, 1.3]
    w = 3
    nodes = [Node("input", "input", [], shape=[1, w]),
             Node("site", "sfn", ["input"]),          # fed by the input: exercises the explicit fan-out
             Node("fc", "linear", ["site"], params={"weight": torch.eye(w), "bias": torch.zeros(w)}, shape=[1, w])]
    nodes[1] = _site("site", "input", w, bpos, bneg, [0.5, 0.25], [0, 1, 2, 4, 8])
    model = ConvertedModel(Graph(nodes, "fc"), [w])
    b = np.float32(bpos + [-v for v in bneg])
    vals = np.concatenate([b, np.nextafter(b, np.float32(-np.inf)), np.nextafter(b, np.float32(np.inf)),
                           np.float32([0.0, -0.0, 100.0, -100.0])]).astype(np.float32)
    x = torch.from_numpy(vals)[:, None].repeat(1, w)
    info, got, ref, gl, rl = roundtrip(model, tmp_path, x)
    for k in rl:
        assert torch.equal(gl[k], rl[k])
    assert torch.allclose(got, ref, atol=1e-6)
    # exactly on a boundary: fires that level (negative branch: −x exactly on b⁻)
    assert torch.equal(rl["site"][:4, 0], torch.tensor([1, 2, 4, 8]))
    assert torch.equal(gl["site"][:len(bpos), 0], torch.tensor([1, 2, 4, 8]))
    assert torch.equal(gl["site"][len(bpos):len(b), 0], torch.tensor([-1, -2]))


def _vit_like():
    p = {"weight": torch.randn(8, 8), "bias": torch.zeros(8)}
    nodes = [Node("input", "input", [], shape=[1, 4, 8]),
             Node("norm1", "layer_norm", ["input"], {"normalized_shape": [8], "eps": 1e-6}, shape=[1, 4, 8]),
             Node("q", "linear", ["norm1"], params=p, shape=[1, 4, 8]),
             Node("k", "linear", ["norm1"], params=p, shape=[1, 4, 8]),
             Node("kt", "transpose", ["k"], {"dim0": 1, "dim1": 2}, shape=[1, 8, 4]),
             Node("scores", "matmul", ["q", "kt"], shape=[1, 4, 4]),
             Node("attn", "softmax", ["scores"], {"dim": -1}, shape=[1, 4, 4]),
             Node("ctx", "matmul", ["attn", "q"], shape=[1, 4, 8]),
             Node("act", "gelu", ["ctx"], shape=[1, 4, 8]),
             Node("res", "add", ["act", "input"], shape=[1, 4, 8]),
             Node("pool", "max_pool2d", ["res"], shape=[1, 4, 8])]
    return Graph(nodes, "pool")


def test_refusal_lists_every_node():
    g = _vit_like()
    with pytest.raises(UserError) as e:
        to_nir(ConvertedModel(g, [4, 8]))
    lines = str(e.value).splitlines()
    refused = [("norm1", "layer_norm"), ("kt", "transpose"), ("scores", "matmul"), ("attn", "softmax"),
               ("ctx", "matmul"), ("act", "gelu"), ("res", "add"), ("pool", "max_pool2d")]
    assert "8 node(s)" in lines[0] and len(lines) == 1 + len(refused)
    for (name, op), line in zip(refused, lines[1:]):
        assert line.strip().startswith(f"{name} ({op}):"), line
    assert "max pooling of analog values" in str(e.value)


def test_bundled_mnist_cnn_with_max_pooling_roundtrips(tmp_path):
    """examples/models/mnist_cnn max-pools spikes twice: each pool becomes SumPool2d + Threshold (OR of channels)."""
    ep = torch.export.load(os.path.join(MODELS, "mnist_cnn.pt2"))
    torch.manual_seed(0)
    x = torch.rand(32, 1, 28, 28)
    snn = convert(ep, Dataset(x, torch.randint(0, 10, (32,)), "random"), scale=0.3)
    info, got, ref, gl, rl = roundtrip(snn, tmp_path, x)
    assert_same(got, ref, gl, rl)
    graph = nir.read(info["path"])
    assert sum(isinstance(n, nir.SumPool2d) for n in graph.nodes.values()) == 2


def test_max_pooling_of_signed_spikes_is_exact(digits, tmp_path):
    """Without a ReLU the site is dual: positive channels pool as OR, negative ones as AND (all must fire)."""
    torch.manual_seed(1)
    m = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.MaxPool2d(2), nn.Conv2d(4, 6, 3, padding=1),
                      nn.Flatten(), nn.Linear(6 * 4 * 4, 10)).eval()
    snn = convert(m, digits.limit(200), scale=0.3)
    assert any(s.params["bounds_neg"].numel() for s in snn.sites)
    assert any(n.op == "max_pool2d" for n in snn.graph.nodes)
    _, got, ref, gl, rl = roundtrip(snn, tmp_path, digits.x[:300])
    assert_same(got, ref, gl, rl)


def test_atomic_write_keeps_existing_file(mlp_snn, tmp_path, monkeypatch):
    path = tmp_path / "m.nir"
    path.write_bytes(b"previous")
    with pytest.raises(UserError):
        export_nir(ConvertedModel(_vit_like(), [4, 8]), str(path))

    def broken(fname, graph):
        with open(fname, "wb") as f:
            f.write(b"half")
        raise OSError("disk full")
    monkeypatch.setattr(nir, "write", broken)
    with pytest.raises(OSError):
        export_nir(mlp_snn, str(path))
    assert path.read_bytes() == b"previous" and os.listdir(tmp_path) == ["m.nir"]


def test_graph_written_by_hand_runs_and_foreign_primitives_are_named(tmp_path):
    """A NIR file this project did not write: supported primitives run; others get one line each."""
    w1 = np.array([[1.0, -1.0], [0.5, 2.0], [0.0, 1.0]], np.float32)
    w2 = np.array([[1.0, 2.0, 3.0]], np.float32)
    g = nir.NIRGraph(nodes={"input": nir.Input(input_type={"input": np.array([2])}),
                            "fc1": nir.Affine(weight=w1, bias=np.array([0.0, 0.0, 0.5], np.float32)),
                            "spk": nir.Threshold(threshold=np.array([0.0, 1.0, 1.0], np.float32)),
                            "fc2": nir.Linear(weight=w2),
                            "output": nir.Output(output_type={"output": np.array([1])})},
                     edges=[("input", "fc1"), ("fc1", "spk"), ("spk", "fc2"), ("fc2", "output")])
    path = str(tmp_path / "other.nir")
    nir.write(path, g)
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]])
    v = x @ torch.from_numpy(w1).T + torch.tensor([0.0, 0.0, 0.5])
    ref = (v > torch.tensor([0.0, 1.0, 1.0])).float() @ torch.from_numpy(w2).T     # NIR's strict threshold
    assert torch.equal(load_nir(path)(x), ref)
    g.nodes["lif"] = nir.LIF(tau=np.ones(3), r=np.ones(3), v_leak=np.zeros(3), v_threshold=np.ones(3))
    g.edges = [("input", "fc1"), ("fc1", "lif"), ("lif", "fc2"), ("fc2", "output")]
    del g.nodes["spk"]
    nir.write(path, g)
    with pytest.raises(UserError, match=r"1 node\(s\) use primitives.*\n  lif \(LIF\)"):
        load_nir(path)
    (tmp_path / "junk.nir").write_bytes(b"not hdf5")
    with pytest.raises(UserError, match="not a readable NIR file"):
        load_nir(str(tmp_path / "junk.nir"))
