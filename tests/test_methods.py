"""Baseline methods (docs/methods.md): IF over T steps, its one-step MTN equivalent, ECMT.

Exact tests use dyadic values (θ = 1, T a power of two, weights k/2^j) so floating point is exact;
accuracy tests use real data (sklearn digits, MNIST) with few samples.
"""
import json
import os

import pytest
import torch
from click.testing import CliRunner
from conftest import MODELS
from hypothesis import given, settings
from hypothesis import strategies as st

from sfn_deploy import convert, evaluate, load_data, load_model
from sfn_deploy.cli import main
from sfn_deploy.errors import UserError
from sfn_deploy.ir import Graph, Node
from sfn_deploy.model_file import ConvertedModel, load, save
from sfn_deploy.neurons import if_neuron
from sfn_deploy.passes import configure
from sfn_deploy.simulators.counting import count_ops
from sfn_deploy.simulators.interpreter import run
from sfn_deploy.simulators.temporal import temporal_plan


def _site(name, src, op, T, n, theta=1.0, levels=None, rounding="floor", lam=1.0, absorbs=None):
    attrs = {"kind": "dual", "levels": levels or [1], "rounding": rounding, "theta_pos": theta, "theta_neg": 0.0,
             "o_max": 0.0, "lam": lam, "absorbs": absorbs, "M": len(levels or [1]), "fire": "test", "T": T,
             "v0": 0.0, "role": "test"}
    return configure(Node(name, op, [src], attrs, {}, [1, n], 0), lam)


def _linear(name, src, w, b=None):
    p = {"weight": w} if b is None else {"weight": w, "bias": b}
    return Node(name, "linear", [src], {}, p, [1, w.shape[0]], 0)


def _pair(T, w2, w3, n):
    """The same two-layer network as IF over T steps and as single-step MTNs (N = T, θ_M = θ/T)."""
    def build(op, levels, lam):
        nodes = [Node("input", "input", [], {}, {}, [1, n], 0),
                 _site("s1", "input", op, T, n, levels=levels, lam=lam),
                 _linear("fc2", "s1", w2),
                 _site("s2", "fc2", op, T, w2.shape[0], levels=levels, lam=lam),
                 _linear("fc3", "s2", w3)]
        return Graph(nodes, "fc3", T if op == "if_neuron" else 1, "if" if op == "if_neuron" else "mtn")
    return build("if_neuron", [1], 1.0), build("sfn", list(range(1, T + 1)), 1.0 / T)


@settings(max_examples=40, deadline=None)
@given(logT=st.integers(0, 5), n=st.integers(1, 6), m=st.integers(1, 5), seed=st.integers(0, 10 ** 6))
def test_theorem_2_if_over_T_steps_equals_one_step_mtn_exactly(logT, n, m, seed):
    """Inputs in [0, θ] at every step (Theorem 1's condition): the IF network's rate equals the MTN network's
    output bit for bit, layer after layer (Theorem 2), and so do the spike counts (paper convention)."""
    T = 2 ** logT
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 65, (7, n), generator=g).float() / 64                 # constant input in [0, θ]
    w2 = torch.randint(0, 5, (m, n), generator=g).float() / 4
    w2 = w2 / torch.clamp(2 ** torch.ceil(torch.log2(w2.sum(1, keepdim=True).clamp(min=1))), min=1)   # rows ≤ θ
    w3 = (torch.randint(-8, 9, (3, m), generator=g).float() / 8)
    gi, gm = _pair(T, w2, w3, n)
    yi, ym = run(gi, x), run(gm, x)
    assert torch.equal(yi, ym)
    ci, cm = count_ops(gi, [x]), count_ops(gm, [x])
    assert ci.ac_snn == cm.ac_snn                   # IF spikes over T steps = MTN levels (y ACs per fan-out)
    assert ci.synops("event") == ci.ac_snn          # binary spikes: event = spike convention
    assert ci.mac_ann == cm.mac_ann                 # the ANN reference is counted once, not T times


def test_if_site_matches_the_reference_if_neuron_and_counts_every_step():
    """One IF site with a constant input: rate = neurons.if_neuron; spikes counted over T steps."""
    T, n = 16, 5
    x = torch.tensor([[0.0, 0.3, 0.99, 1.0, 2.5]])
    nodes = [Node("input", "input", [], {}, {}, [1, n], 0), _site("s", "input", "if_neuron", T, n),
             _linear("fc", "s", torch.ones(2, n))]
    g = Graph(nodes, "fc", T, "if")
    rate = if_neuron(x.expand(T, 1, n), 1.0)
    seen = []
    y = run(g, x, hook=lambda node, a, out, e: seen.append((node.name, e.get("t"))))
    assert torch.allclose(y, rate @ torch.ones(2, n).T)
    assert [t for name, t in seen if name == "s"] == list(range(T))
    assert [t for name, t in seen if name == "input"] == [None]          # static: evaluated once
    c = count_ops(g, [x])
    spikes = float(rate.sum()) * T
    assert c.ac_snn == spikes * 2 and c.layers[1].spikes == spikes
    assert c.layers[1].firing_rate == pytest.approx(float(rate.sum()) / n)      # spikes per neuron per step


def test_first_layer_on_the_constant_image_counts_its_macs_once():
    T = 8
    w1 = torch.randn(6, 4)
    nodes = [Node("input", "input", [], {}, {}, [1, 4], 0), _linear("fc1", "input", w1),
             _site("s", "fc1", "if_neuron", T, 6, theta=0.5), _linear("fc2", "s", torch.randn(3, 6))]
    g = Graph(nodes, "fc2", T, "if")
    c = count_ops(g, [torch.randn(5, 4)])
    assert temporal_plan(g)["fc1"] == "static"
    assert c.mac_snn == 6 * 4 and c.mac_ann == 6 * 4 + 3 * 6


def test_expectation_compensation_gives_f_of_the_mean():
    """ECM: Σ_t O(t) = T·f(mean input) — a GELU after an IF site outputs GELU(rate) on average."""
    T, n = 8, 6
    x = torch.linspace(-0.5, 1.5, n).reshape(1, n)
    nodes = [Node("input", "input", [], {}, {}, [1, n], 0), _site("s", "input", "if_neuron", T, n),
             Node("gelu", "gelu", ["s"], {"approximate": "none"}, {}, [1, n], 0)]
    nodes[1].params["bounds_neg"] = torch.tensor([1.0])       # two-sided IF (θ⁻ = 1)
    nodes[1].params["steps"] = torch.tensor([1.0, 1.0])
    g = Graph(nodes, "gelu", T, "if")
    assert temporal_plan(g)["gelu"] == "ecm"
    rate = if_neuron(x.clamp(min=0).expand(T, 1, n), 1.0) - if_neuron((-x).clamp(min=0).expand(T, 1, n), 1.0)
    assert torch.allclose(run(g, x), torch.nn.functional.gelu(rate), atol=1e-6)


def test_ecm_product_is_the_product_of_running_means():
    """ECMT's matmul compensation: the cumulative output of A·B is S_A·S_B/t."""
    T = 4
    nodes = [Node("input", "input", [], {}, {}, [1, 2, 3], 0),
             _site("a", "input", "if_neuron", T, 3), _site("b", "input", "if_neuron", T, 3),
             Node("bt", "transpose", ["b"], {"dim0": 1, "dim1": 2}, {}, [1, 3, 2], 0),
             Node("mm", "matmul", ["a", "bt"], {}, {}, [1, 2, 2], 0)]
    for s in nodes[1:3]:
        s.shape = [1, 2, 3]
    nodes[2].params["bounds_pos"] = torch.tensor([0.5])
    nodes[2].params["steps"] = torch.tensor([0.5, 0.0])
    g = Graph(nodes, "mm", T, "if")
    x = torch.tensor([[[0.25, 0.5, 0.75], [1.0, 0.125, 0.0]]])
    ra = if_neuron(x.expand(T, 1, 2, 3), 1.0)
    rb = if_neuron(x.expand(T, 1, 2, 3), 0.5)
    assert torch.allclose(run(g, x), ra @ rb.transpose(1, 2), atol=1e-6)
    c = count_ops(g, [x])
    assert c.layers[-1].input == "spikes" and c.ac_snn > 0 and c.mac_snn == 0


def test_max_pool_gate_passes_the_most_active_neuron():
    """Max pooling of spikes: an OR of the window's spikes overestimates the largest rate; the gate passes the
    neuron with the larger running count, so the pooled rate approaches the largest rate."""
    T = 64
    nodes = [Node("input", "input", [], {}, {}, [1, 1, 1, 2], 0),
             _site("s", "input", "if_neuron", T, 2),
             Node("pool", "max_pool2d", ["s"], {"kernel_size": [1, 2], "stride": [1, 2], "padding": [0, 0],
                                                "dilation": [1, 1], "ceil_mode": False}, {}, [1, 1, 1, 1], 0)]
    nodes[1].shape = [1, 1, 1, 2]
    nodes[1].attrs["v0"] = 0.0
    g = Graph(nodes, "pool", T, "if")
    assert temporal_plan(g)["pool"] == "gate"
    x = torch.tensor([[[[0.25, 0.75]]]])
    assert float(run(g, x)) == pytest.approx(0.75)
    x = torch.tensor([[[[0.5, 0.625]]]])
    v, spikes = torch.zeros(2), []
    for _ in range(T):                          # the plain IF spike trains of the two neurons
        v = v + x.reshape(2)
        s = (v >= 1).float()
        v = v - s
        spikes.append(s)
    spikes = torch.stack(spikes)
    assert spikes.mean(0).tolist() == [0.5, 0.625]
    or_rate = float(spikes.max(1).values.mean())
    gate = float(run(g, x))
    assert or_rate >= 0.74 and abs(gate - 0.625) <= 2 / T


# ---------------------------------------------------------------- real data

def test_if_and_mtn_on_digits(digits_mlp, digits):
    train, test = digits.split(0.8, seed=0)
    test = test.limit(300)
    res = {}
    for method, T in (("if", 1), ("mtn", 1), ("if", 4), ("if", 64), ("mtn", 64)):
        snn = convert(digits_mlp, train, method=method, timesteps=T)
        res[method, T] = (snn, evaluate(snn, test))
    (i1, r1), (m1, q1) = res["if", 1], res["mtn", 1]
    assert torch.equal(run(i1.graph, test.x), run(m1.graph, test.x))      # T = 1: the same neuron
    assert r1["ac_snn"] == q1["ac_snn"]
    ann = res["mtn", 64][1]["ann_accuracy"]
    assert ann > 90
    assert res["mtn", 64][1]["accuracy"] > ann - 3
    assert res["if", 64][1]["accuracy"] > ann - 5
    assert res["if", 64][1]["accuracy"] > res["if", 4][1]["accuracy"] + 5
    assert res["if", 64][0].graph.timesteps == 64 and res["mtn", 64][0].graph.timesteps == 1


@pytest.fixture(scope="module")
def mnist(mnist_dir):
    return load_data(f"mnist:{mnist_dir}:0:500"), load_data(f"mnist:{mnist_dir}:8000:8200")


def test_if_mtn_ecmt_on_the_mnist_cnn(mnist):
    train, test = mnist
    model, _ = load_model(os.path.join(MODELS, "mnist_cnn.pt2"))
    runs = {}
    for method, T in (("if", 1), ("mtn", 1), ("if", 64), ("mtn", 32), ("ecmt", 8)):
        snn = convert(model, train, method=method, timesteps=T)
        runs[method, T] = (snn, evaluate(snn, test))
    assert torch.equal(run(runs["if", 1][0].graph, test.x[:64]), run(runs["mtn", 1][0].graph, test.x[:64]))
    plan = temporal_plan(runs["if", 64][0].graph)
    assert sorted(set(plan.values())) == ["gate", "state", "static", "step"]   # both max pools gated
    ann = runs["if", 1][1]["ann_accuracy"]
    assert runs["mtn", 32][1]["accuracy"] >= ann - 2
    assert runs["if", 64][1]["accuracy"] >= ann - 3
    assert runs["if", 1][1]["accuracy"] < 50                                  # one binary step is not enough
    assert runs["ecmt", 8][1]["accuracy"] > 80
    # every ReLU site of the CNN is one-sided: IF spikes are binary, so both conventions agree
    r = runs["if", 64][1]
    assert r["energy_ratio"] > runs["if", 1][1]["energy_ratio"]


def test_ecmt_on_the_mnist_vit_improves_with_T(mnist):
    train, test = mnist
    test = test.limit(100)
    model, _ = load_model(os.path.join(MODELS, "mnist_vit.pt2"))
    acc = {}
    for T in (1, 4):
        snn = convert(model, train, method="ecmt", timesteps=T)
        acc[T] = evaluate(snn, test)["accuracy"]
    g = snn.graph
    plan = temporal_plan(g)
    hosts = [plan[n.name] for n in g.nodes if n.op in ("layer_norm", "gelu", "softmax")]
    assert hosts[0] == "static" and set(hosts[1:]) == {"ecm"}      # LN on the (constant) embedding: computed once
    assert {plan[n.name] for n in g.nodes if n.op == "matmul"} == {"ecm"}
    soft = [s for s in g.sites if s.attrs["role"] == "post-softmax"]
    assert soft and all(s.attrs["theta_pos"] == 0.0125 and s.attrs["levels"][-1] == 128 for s in soft)
    assert acc[4] > acc[1] + 20 and acc[4] > 85


# ---------------------------------------------------------------- files, exporters, CLI

def test_files_round_trip_and_old_files_still_load(tmp_path, digits_mlp, digits):
    snn = convert(digits_mlp, digits.limit(300), method="if", timesteps=8)
    path = str(tmp_path / "if.pt")
    save(snn, path)
    back = load(path)
    assert torch.load(path, weights_only=True)["format_version"] == 2
    assert back.graph.method == "if" and back.graph.timesteps == 8 and back.graph.stateful
    assert torch.equal(run(back.graph, digits.x[:50]), run(snn.graph, digits.x[:50]))
    sfn = convert(digits_mlp, digits.limit(300), scale=0.3)
    d = sfn.to_dict()
    assert d["format_version"] == 1                      # plain SFN files stay readable by older releases
    del d["graph"]["timesteps"], d["graph"]["method"]     # a file written before methods existed
    old = ConvertedModel.from_dict(d)
    assert old.graph.method == "sfn" and old.graph.timesteps == 1 and not old.graph.stateful
    assert torch.equal(run(old.graph, digits.x[:50]), run(sfn.graph, digits.x[:50]))


def test_exporters_refuse_multi_step_methods_by_name(tmp_path, digits_mlp, digits):
    from sfn_deploy.exporters.nir import export_nir
    from sfn_deploy.exporters.onnx import OnnxRunner, export_onnx, to_onnx
    snn = convert(digits_mlp, digits.limit(300), method="if", timesteps=8)
    for export in (export_onnx, export_nir):
        with pytest.raises(UserError, match="--method if"):
            export(snn, str(tmp_path / "x.out"))
    assert not os.listdir(tmp_path)
    mtn = convert(digits_mlp, digits.limit(300), method="mtn", timesteps=8)     # one step: exports
    out = OnnxRunner(to_onnx(mtn)).run(digits.x[:100].numpy())
    assert torch.allclose(torch.from_numpy(out), run(mtn.graph, digits.x[:100]), atol=1e-4)


def test_cli_convert_methods(tmp_path, digits_pt2):
    out = tmp_path / "m.pt"
    r = CliRunner().invoke(main, ["convert", digits_pt2, "--data", "sklearn:digits", "--method", "if", "-T", "8",
                                  "-o", str(out), "--json"])
    assert r.exit_code == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["method"] == "if" and d["timesteps"] == 8 and d["config"]["percentile"] == 0.1
    assert "convert_seconds" in d and d["ann_accuracy"] > 80
    for args, msg in ((["--method", "mbe"], "has none"),       # MBE needs GELU/softmax/LayerNorm
                      (["--method", "pmsm", "-T", "4"], "one timestep"),
                      (["--method", "if", "--scale", "0.2"], "has no λ"),
                      (["--timesteps", "4"], "one timestep"),
                      (["--method", "mtn", "--v0", "0.3"], "v0")):
        r = CliRunner().invoke(main, ["convert", digits_pt2, "--data", "sklearn:digits", "-o",
                                      str(tmp_path / "bad.pt"), *args])
        assert r.exit_code == 2 and msg in r.stderr, (args, r.stderr)
    assert not (tmp_path / "bad.pt").exists()
    r = CliRunner().invoke(main, ["export", "--target", "onnx", str(out)])
    assert r.exit_code == 2 and "--method if" in r.stderr


def test_report_of_a_multi_step_network(digits_mlp, digits):
    """The hardware report reads the T-step counts: method and T named, neuron updates = neurons × T."""
    from sfn_deploy.report import build_report, compare
    data = digits.limit(200)
    snn = convert(digits_mlp, data, method="if", timesteps=8)
    r = build_report(snn, data, ["cmos45", "loihi2"], label="if8")
    assert r["method"] == "if" and r["timesteps"] == 8
    assert r["neuron_updates"] == (64 + 32) * 8
    assert r["energy_ratio_by_convention"]["spike"] == pytest.approx(r["energy_ratio_by_convention"]["event"])
    sites = [d for d in r["layers"] if d["op"] == "if_neuron"]
    assert len(sites) == 2 and all(0 < d["firing_rate"] <= 1 for d in sites)
    row = compare([r])["comparison"][0]
    assert row["method"] == "if" and row["timesteps"] == 8


def test_pmsm_snn_at_one_step_is_the_fine_tuned_quantised_ann(digits_mlp, digits):
    """PMSM-R: after the fine-tune the single-step multi-spike SNN computes the fake-quantised ANN."""
    import math

    from sfn_deploy.pmsm import forward
    train, test = digits.split(0.8, seed=0)
    snn = convert(digits_mlp, train, method="pmsm", epochs=2)
    ft = snn.metrics["finetune"]
    assert ft["steps"] == 2 * -(-len(train) // 128) and ft["loss_last"] < ft["loss_first"] + 0.5
    sites = snn.sites
    assert all(s.op == "sfn" and s.attrs["levels"] == list(range(1, 9)) and s.attrs["method"] == "pmsm"
               for s in sites)
    thetas = {s.name: (torch.tensor(math.log(s.attrs["theta_pos"])),
                       torch.tensor(math.log(s.attrs["theta_neg"])) if s.attrs["theta_neg"] else None)
              for s in sites}
    with torch.no_grad():
        qann = forward(snn.graph, test.x, thetas, 8)
    out = run(snn.graph, test.x)
    assert (qann.argmax(-1) == out.argmax(-1)).float().mean() > 0.99
    assert torch.allclose(qann, out, atol=1e-3)
    assert evaluate(snn, test)["accuracy"] > 85


def test_entropy_initialisation_prefers_spread_levels():
    from sfn_deploy.calibrate import StreamingHistogram
    from sfn_deploy.pmsm import entropy_init, level_entropy
    h = StreamingHistogram(1024)
    h.update(torch.cat([torch.rand(10000), torch.tensor([50.0])]))      # uniform on [0, 1) and one outlier
    theta = entropy_init(h, 4)
    assert 0.2 <= theta * 4 <= 1.01                                    # the outlier does not set the range
    assert level_entropy(h, theta, 4) > level_entropy(h, 50.0 / 4, 4)
    assert level_entropy(h, 0.25, 4) == pytest.approx(2.25, abs=0.01)   # masses 1/8, 1/4, 1/4, 1/4, 1/8
