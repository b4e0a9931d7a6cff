"""Lava target: plan, bundle, processes, runs against the torch reference on real data.

Every Lava run happens in a killable subprocess (run_lava) and is short (tens of samples)."""
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from conftest import convert_example

from sfn_deploy.convert import convert
from sfn_deploy.errors import UserError
from sfn_deploy.exporters.lava import export_lava, load_network, lower, run_lava
from sfn_deploy.exporters.lava.plan import quantise, weight_exponent
from sfn_deploy.simulators.interpreter import run_with_levels

pytest.importorskip("lava.magma")


def _levels(lv, n):
    return {k: v.reshape(n, -1).numpy() for k, v in lv.items()}


@pytest.fixture(scope="module")
def digits_snn(digits_mlp, digits):
    return convert(digits_mlp, digits.limit(400), scale=0.3)


@pytest.fixture(scope="module")
def mnist_cnn(mnist_dir):
    return convert_example("mnist_cnn", mnist_dir, calib=500, test=40)     # 40 real test images


@pytest.fixture(scope="module")
def cnn_bundle(mnist_cnn, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("lava") / "cnn")
    export_lava(mnist_cnn[0], path)
    return path


# -- plan (no Lava run) -------------------------------------------------------------------------------------

def test_plan_of_the_cnn_places_weight_layers_and_neurons_on_cores_and_pooling_on_the_host(mnist_cnn):
    plan = lower(mnist_cnn[0], "graded", "floating_pt")
    kinds = [b.kind for b in plan.blocks]
    assert kinds.count("conv") == 3 and kinds.count("neuron") == 3 and kinds.count("dense") == 1
    assert plan.latency == 4                      # four synaptic layers on the path: one step each
    hosts = {b.name: b.attrs["ops"] for b in plan.blocks if b.kind == "host"}
    assert sorted(op for ops in hosts.values() for op in ops) == ["flatten", "max_pool2d", "max_pool2d"]
    # pooled spikes go back to the chip as levels, with the spike scale folded into the next weights
    pool_out = [o for b in plan.blocks if b.kind == "host" for o in b.attrs["outputs"] if o["encode"] == "levels_pos"]
    assert len(pool_out) == 2


def test_fixed_point_weights_are_8_bit_with_one_exponent_per_layer(mnist_cnn):
    plan = lower(mnist_cnn[0], "graded", "fixed_pt", input_abs_max=2.9)
    for b in plan.blocks:
        if b.kind == "conv":
            assert np.abs(b.arrays["weight"]).max() <= 127
        elif b.kind in ("dense", "sparse"):     # stored as 2w: Lava drops the LSB of mixed-sign weights
            w = b.arrays["weight"]
            assert np.abs(w).max() <= 254 and not np.any(np.asarray(w, np.int64) % 2)
        elif b.kind == "neuron":
            assert np.asarray(b.arrays["thr_pos"]).dtype.kind == "i"
    assert weight_exponent(127.0) == 0 and weight_exponent(128.0) == 1 and weight_exponent(0.5) == -7
    assert quantise(np.array([1.0, -300.0, 0.26]), -2).tolist() == [4, -127, 1]


def test_fixed_point_refuses_an_unknown_input_range(mnist_cnn):
    with pytest.raises(UserError, match="input's range"):
        lower(mnist_cnn[0], "graded", "fixed_pt", input_abs_max=None)


# -- runs against the torch reference ----------------------------------------------------------------------

def test_float_cnn_gives_the_reference_spike_levels_on_real_images(mnist_cnn, cnn_bundle):
    snn, data = mnist_cnn
    ref, lv = run_with_levels(snn.graph, data.x)
    r = run_lava(cnn_bundle, data.x.numpy(), "floating_pt", record=True, timeout=300)
    for site, levels in _levels(lv, len(data)).items():
        assert np.array_equal(r["levels"][site], levels), site
    assert np.abs(r["outputs"] - ref.numpy()).max() < 1e-4
    assert r["latency"] == 4


def test_fixed_point_cnn_keeps_predictions_and_reports_counters(mnist_cnn, cnn_bundle):
    snn, data = mnist_cnn
    ref, lv = run_with_levels(snn.graph, data.x)
    r = run_lava(cnn_bundle, data.x.numpy(), "fixed_pt", record=True, timeout=300)
    agree = (r["outputs"].argmax(1) == ref.numpy().argmax(1)).mean()
    assert agree >= 0.95
    first = snn.sites[0].name
    assert (r["levels"][first] == _levels(lv, len(data))[first]).mean() > 0.98
    assert set(r["counts"]) >= {"sfn_" + s.name for s in snn.sites} | {"conv_conv2d"}
    assert all(len(v) == 2 and min(v) >= 0 for v in r["counts"].values())


def test_channel_lowering_equals_graded_in_float(digits_snn, digits, tmp_path):
    x = digits.x[:30]
    ref, lv = run_with_levels(digits_snn.graph, x)
    path = str(tmp_path / "ch")
    info = export_lava(digits_snn, path, lowering="channels", input_abs_max=float(digits.x.abs().max()))
    assert info["lowering"] == "channels"
    r = run_lava(path, x.numpy(), "floating_pt", record=True, timeout=300)
    for site, levels in _levels(lv, len(x)).items():
        assert np.array_equal(r["levels"][site], levels), site
    assert np.abs(r["outputs"] - ref.numpy()).max() < 1e-4
    # fixed point: channel increments span more than 8 bits hold, so copies are split by weight exponent
    plan = lower(digits_snn, "channels", "fixed_pt", input_abs_max=1.0)
    shifts = {b.attrs["shift"] for b in plan.blocks if b.kind == "dense" and b.attrs["polarity"] != "analog"}
    assert len(shifts) > 1 and min(shifts) == 0
    assert len({b.name for b in plan.blocks}) == len(plan.blocks)   # group blocks of layer "linear" vs "linear_1"
    r = run_lava(path, x.numpy(), "fixed_pt", timeout=300)
    assert (r["outputs"].argmax(1) == ref.numpy().argmax(1)).mean() >= 0.9


def test_vit_runs_in_lava_with_host_blocks_and_reference_levels(mnist_dir, tmp_path):
    snn, test = convert_example("mnist_vit", mnist_dir, calib=200, test=6)
    x = test.x
    ref, lv = run_with_levels(snn.graph, x)
    path = str(tmp_path / "vit")
    info = export_lava(snn, path)
    assert {"layer_norm", "softmax", "gelu", "matmul", "add"} <= set(info["host_ops"])
    r = run_lava(path, x.numpy(), "floating_pt", record=True, timeout=600)
    same = np.mean([np.array_equal(r["levels"][s], v) for s, v in _levels(lv, len(x)).items()])
    assert same == 1.0
    assert (r["outputs"].argmax(1) == ref.numpy().argmax(1)).all()
    # fixed point (docs/benchmarks.md: 98 % of predictions kept on 500 images)
    r = run_lava(path, x.numpy(), "fixed_pt", timeout=600)
    assert (r["outputs"].argmax(1) == ref.numpy().argmax(1)).sum() >= len(x) - 1
    assert sum(v[0] for v in r["counts"].values()) == 0           # no accumulator overflow


def test_a_user_program_wires_the_bundle_between_its_own_source_and_sink(digits_snn, digits, tmp_path):
    """load_network: one call, input port in, output port out, outputs `latency` steps later."""
    path = str(tmp_path / "b")
    export_lava(digits_snn, path, input_abs_max=float(digits.x.abs().max()))
    x = digits.x[:5]
    ref = run_with_levels(digits_snn.graph, x)[0].numpy()
    script = f"""
import numpy as np, json, sys
from lava.magma.core.run_conditions import RunSteps
from lava.proc.io.source import RingBuffer as Source
from lava.proc.io.sink import RingBuffer as Sink
from sfn_deploy.exporters.lava import load_network
net = load_network({path!r}, "floating_pt")
x = np.load({str(tmp_path / 'x.npy')!r})
n, L = len(x), net.latency
src = Source(data=np.concatenate([x, np.zeros((L, x.shape[1]))]).T)
snk = Sink(shape=(10,), buffer=n + L)
src.s_out.connect(net.in_port)
net.out_port.connect(snk.a_in)
src.run(condition=RunSteps(num_steps=n + L), run_cfg=net.run_config())
y = snk.data.get()[:, L:].T
src.stop()
np.save({str(tmp_path / 'y.npy')!r}, y)
"""
    np.save(tmp_path / "x.npy", x.reshape(5, -1).numpy().astype(np.float64))
    subprocess.run([sys.executable, "-c", script], check=True, timeout=300, start_new_session=True)
    y = np.load(tmp_path / "y.npy")
    assert np.abs(y - ref).max() < 1e-4


# -- bundle checks ------------------------------------------------------------------------------------------

def test_bundle_refuses_damage_and_strangers(digits_snn, digits, tmp_path):
    path = str(tmp_path / "b")
    export_lava(digits_snn, path, input_abs_max=1.0)
    assert sorted(os.listdir(path)) == ["arrays.npz", "manifest.json"]
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]
    with pytest.raises(UserError, match="not a Lava bundle folder"):
        load_network(str(tmp_path / "nothing"))
    with open(os.path.join(path, "manifest.json")) as f:
        man = json.load(f)
    with open(os.path.join(path, "arrays.npz"), "ab") as f:
        f.write(b"x")
    with pytest.raises(UserError, match="checksum"):
        load_network(path)
    man["format_version"] = 99
    with open(os.path.join(path, "manifest.json"), "w") as f:
        json.dump(man, f)
    with pytest.raises(UserError, match="newer"):
        load_network(path)
    other = tmp_path / "other"
    other.mkdir()
    (other / "file.txt").write_text("mine")
    with pytest.raises(UserError, match="not a Lava bundle; refusing"):
        export_lava(digits_snn, str(other), input_abs_max=1.0)


def test_a_run_past_its_timeout_is_killed_with_a_clear_error(digits_snn, digits, tmp_path):
    path = str(tmp_path / "b")
    export_lava(digits_snn, path, input_abs_max=1.0)
    with pytest.raises(UserError, match="timed out"):
        run_lava(path, digits.x[:50].numpy(), timeout=0.5)


def test_wrong_input_shape_is_refused(digits_snn, tmp_path):
    path = str(tmp_path / "b")
    export_lava(digits_snn, path, input_abs_max=1.0)
    with pytest.raises(UserError, match="expects"):
        run_lava(path, np.zeros((2, 3, 3)))


# -- CLI ----------------------------------------------------------------------------------------------------

def _cli(*args):
    return subprocess.run([sys.executable, "-m", "sfn_deploy.cli", *args], capture_output=True, text=True,
                          timeout=600)


def test_cli_export_simulate_per_layer_and_evaluate_on_lava(digits_snn, tmp_path):
    from sfn_deploy.model_file import save
    model = str(tmp_path / "m.sfn.pt")
    save(digits_snn, model)
    r = _cli("export", "--target", "lava", model, "-o", str(tmp_path / "bundle"), "--data", "sklearn:digits",
             "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["precisions"] == ["floating_pt", "fixed_pt"] and info["latency_steps"] == 3
    r = _cli("simulate", model, "--data", "sklearn:digits", "--limit", "20", "--backend", "lava", "--per-layer",
             "--json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)["parity"]
    assert rows[0]["backend"] == "lava" and rows[0]["first_differing"] is None
    assert all(row["levels_equal"] == 100.0 for row in rows[0]["layers"])
    r = _cli("simulate", model, "--data", "sklearn:digits", "--limit", "20", "--backend", "lava",
             "--precision", "fixed_pt", "--json")
    assert r.returncode == 0, r.stderr
    lava = json.loads(r.stdout)["backends"]["lava"]
    assert lava["lava"]["precision"] == "fixed_pt" and lava["prediction_agreement"] >= 90
    ref = lava["integer_reference"]         # Lava against the integer reference; that against the float SNN
    assert ref["lava_prediction_agreement"] == 100.0 and ref["lava_max_abs_diff"] == 0 and ref["float32_exact"]
    assert ref["snn_prediction_agreement"] == pytest.approx(lava["prediction_agreement"])
    assert ref["accuracy"] == pytest.approx(lava["accuracy"]) and ref["snn_accuracy"] is not None
    from sfn_deploy.exporters.lava.reference import describe
    assert describe(ref).startswith("integer reference (torch SNN with the plan's integers): Lava top-1 agreement "
                                    "100.00% (max|Δ| 0); against the float SNN ")
    r = _cli("evaluate", model, "--data", "sklearn:digits", "--limit", "20", "--backend", "lava", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["backend"] == "lava"
    r = _cli("simulate", str(tmp_path / "bundle"), "--data", "sklearn:digits", "--limit", "20", "--backend", "lava",
             "--precision", "fixed_pt", "--json")          # a bundle runs by itself
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["lava"]["precision"] == "fixed_pt" and out["samples"] == 20 and out["accuracy"] > 80
    r = _cli("simulate", str(tmp_path / "bundle"), "--data", "mnist:/nonexistent", "--backend", "onnx")
    assert r.returncode == 2 and "Lava bundle" in r.stderr
    r = _cli("simulate", model, "--data", "sklearn:digits", "--backend", "torch", "--per-layer")
    assert r.returncode == 2 and "both are torch" in r.stderr


def test_a_failing_host_block_fails_the_run_cleanly_instead_of_hanging(digits_snn, tmp_path):
    """A host model that raises sends a dummy output first, the worker leaves at once, and the caller
    gets the child's traceback (no deadlock, no timeout)."""
    path = str(tmp_path / "b")
    export_lava(digits_snn, path, input_abs_max=1.0)
    man_path = os.path.join(path, "manifest.json")
    with open(man_path) as f:
        man = json.load(f)
    for b in man["plans"]["floating_pt"]["blocks"]:
        for n in b["attrs"].get("nodes", []):
            if n["op"] == "flatten":
                n["op"], n["attrs"] = "reshape", {"shape": [7, 7, 7]}     # cannot hold 64 values
    from sfn_deploy.exporters.lava.bundle import manifest_digest
    man["sha256"] = manifest_digest(man)      # a deliberate edit: checksum recomputed, structure still valid
    with open(man_path, "w") as f:
        json.dump(man, f)
    import time
    t0 = time.time()
    with pytest.raises(RuntimeError, match="Lava run failed"):
        run_lava(path, np.zeros((3, 1, 8, 8)), timeout=120)
    assert time.time() - t0 < 100


def test_channel_lowering_max_pools_on_cores_exactly(mnist_cnn, tmp_path):
    """Threshold channels are cumulative, so max pooling is an OR per channel: a depthwise sum Conv and a
    neuron at 1/2, on cores; the CNN then has no host work besides input encoding and output decoding."""
    snn, data = mnist_cnn
    plan = lower(snn, "channels", "floating_pt")
    assert plan.summary()["host_ops"] == [] and plan.latency == 6      # two pooling Convs add a step each
    assert sum(b.name.startswith("pool_") for b in plan.blocks) == 2
    x = data.x[:20]
    ref, lv = run_with_levels(snn.graph, x)
    path = str(tmp_path / "ch")
    export_lava(snn, path, lowering="channels")
    r = run_lava(path, x.numpy(), "floating_pt", record=True, timeout=300)
    for site, levels in _levels(lv, len(x)).items():
        assert np.array_equal(r["levels"][site], levels), site
    assert np.abs(r["outputs"] - ref.numpy()).max() < 1e-4


def test_a_network_too_large_for_lavas_python_simulator_is_refused_before_building(digits_snn, monkeypatch):
    import sys
    b = sys.modules["sfn_deploy.exporters.lava.build"]
    plan = lower(digits_snn, "graded", "floating_pt")
    n = b.stored_synapses(plan)
    assert n == sum(int(np.count_nonzero(x.arrays["weight"])) for x in plan.blocks if "weight" in x.arrays)
    monkeypatch.setattr(b, "MAX_SYNAPSES", n - 1)
    with pytest.raises(UserError, match="Lava simulation refused"):
        b.build(plan)


# -- CNN operations in fixed point: pooling folded, residual sums, host blocks with many inputs ---------------

class _PoolResCatNet:
    """Conv–ReLU, a residual sum, a concatenation of 8 branches (a host block with 8 input ports, more than
    the 6 of a plain HostOp), average pooling read by a convolution and global pooling read by a linear
    layer (both folded into the weights), on sklearn's 8×8 digits."""

    @staticmethod
    def build():
        import torch
        from torch import nn

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.c1, self.c2 = nn.Conv2d(1, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
                self.branches = nn.ModuleList(nn.Conv2d(8, 2, 1) for _ in range(8))
                self.c3, self.fc = nn.Conv2d(16, 16, 3, padding=1), nn.Linear(16, 10)

            def forward(self, x):
                h = torch.relu(self.c1(x))
                h = torch.relu(self.c2(h) + h)
                h = torch.relu(torch.cat([b(h) for b in self.branches], 1))
                h = torch.relu(self.c3(nn.functional.avg_pool2d(h, 2)))
                return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(h, 1), 1))
        torch.manual_seed(0)
        return Net().eval()


@pytest.fixture(scope="module")
def pool_res_cat(digits):
    return convert(_PoolResCatNet.build(), digits.limit(300), scale=0.3)


def test_pooling_folds_into_weights_and_a_host_block_takes_many_inputs(pool_res_cat, digits, tmp_path):
    """Average pooling of spikes runs on cores, folded into the next layer's weights (a convolution over the
    unpooled map, a linear layer W·P), and so does the residual sum (its neurons integrate both operands'
    synapses); the 8-way concatenation stays on the host, in a HostOp with 8 input ports. Floating point
    reproduces the reference's levels exactly."""
    snn = pool_res_cat
    plan = lower(snn, "graded", "floating_pt")
    assert plan.summary()["host_ops"] == ["cat"] and plan.summary()["residual_sums"] == 1
    cat = next(b for b in plan.blocks if "cat" in b.attrs.get("ops", []))
    assert len(cat.attrs["inputs"]) == 8
    conv3 = next(b for b in plan.blocks if b.kind == "conv" and b.attrs["layer"] == "conv2d_10")
    assert conv3.attrs["input_shape"] == [8, 8, 16] and conv3.attrs["stride"] == [2, 2]   # over the 8×8 map
    fc = next(b for b in plan.blocks if b.kind == "dense")
    assert fc.arrays["weight"].shape == (10, 16 * 4 * 4)         # reads the 16×4×4 spikes: W·P
    x = digits.x[300:330]
    ref, lv = run_with_levels(snn.graph, x)
    path = str(tmp_path / "b")
    export_lava(snn, path, input_abs_max=1.0)
    r = run_lava(path, x.numpy(), "floating_pt", record=True, timeout=300)
    for site, levels in _levels(lv, len(x)).items():
        assert np.array_equal(r["levels"][site], levels), site
    assert np.abs(r["outputs"] - ref.numpy()).max() < 1e-4


def test_fixed_point_cnn_with_pooling_residual_sum_and_concatenation(pool_res_cat, digits, tmp_path):
    """Fixed point plans and runs: weights split into a coarse and a fine 8-bit synapse group where the
    accumulator has room; predictions and levels close to the reference (8-bit weights: not bit-exact)."""
    snn = pool_res_cat
    plan = lower(snn, "graded", "fixed_pt", input_abs_max=1.0)
    halves = [b for b in plan.blocks if b.attrs.get("split")]
    assert halves and {b.attrs["shift"] > 0 for b in halves} == {True, False}
    assert all(np.abs(b.arrays["weight"]).max() <= (127 if b.kind == "conv" else 254) for b in halves)
    x = digits.x[300:340]
    ref, lv = run_with_levels(snn.graph, x)
    path = str(tmp_path / "b")
    export_lava(snn, path, input_abs_max=1.0)
    r = run_lava(path, x.numpy(), "fixed_pt", record=True, timeout=300)
    assert (r["outputs"].argmax(1) == ref.numpy().argmax(1)).mean() >= 0.9
    ref_lv = _levels(lv, len(x))
    assert np.mean([(r["levels"][s] == v).mean() for s, v in ref_lv.items()]) > 0.97
    assert r["overflows"] == 0 and r["saturations"] == 0
    # unsplit (one 8-bit group per layer) plans too, with fewer processes
    from sfn_deploy.exporters.lava.plan import _Lowering
    one = _Lowering(snn.graph, snn.input_shape, "graded", "fixed_pt", 1.0, split_weights=False).lower()
    assert len(one.blocks) < len(plan.blocks) and not any(b.attrs.get("split") for b in one.blocks)


def test_fixed_point_derives_the_range_of_an_analog_host_value(digits):
    """A pooling that does not fold (overlapping windows) feeds a convolution from the host: its integer
    range comes from the site's largest level × step, so fixed point plans instead of refusing."""
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2, self.fc = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 4, 3), nn.Linear(4, 10)

        def forward(self, x):
            h = nn.functional.avg_pool2d(torch.relu(self.c1(x)), 3, 2, 1)        # 8×8 → 4×4, overlapping
            return self.fc(torch.relu(self.c2(h)).mean((2, 3)))
    torch.manual_seed(0)
    snn = convert(Net().eval(), digits.limit(200), scale=0.3, input_encoding="analog")
    from sfn_deploy.exporters.lava.plan import _Lowering
    low = _Lowering(snn.graph, snn.input_shape, "graded", "fixed_pt", 1.0)
    plan = low.lower()
    site = snn.sites[0]
    top = float(site.params["table"][site.params["bounds_pos"].numel()] * site.params["steps"][0])
    assert low.bounds["avg_pool2d"] == pytest.approx(top)
    conv = next(b for b in plan.blocks if b.kind == "conv" and b.attrs["layer"] == "conv2d_1")
    assert conv.attrs["polarity"] == "analog"
    c = next(c for c in plan.connections if c["dst"] == conv.name)
    enc = next(o for o in plan.block(c["src"]).attrs["outputs"] if o["port"] == c["src_port"])
    assert enc["encode"] == "int" and 127 <= top / enc["scale"] < 2 ** 16    # 8 to 16 bits over the derived range


class _SiluPoolNet:
    """SiLU (sites with negative levels) before a 2×2 average pooling read by a convolution, and a global mean
    without keepdim read by a linear layer: both poolings become pooling layers with --avg-pool layer."""

    @staticmethod
    def build():
        import torch
        from torch import nn

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.c1, self.c2, self.fc = nn.Conv2d(1, 6, 3, padding=1), nn.Conv2d(6, 8, 3, padding=1), \
                    nn.Linear(8, 10)

            def forward(self, x):
                h = nn.functional.avg_pool2d(nn.functional.silu(self.c1(x)), 2)
                return self.fc(nn.functional.silu(self.c2(h)).mean((2, 3)))
        torch.manual_seed(0)
        return Net().eval()


def test_pooling_layer_form_runs_on_cores_in_both_precisions(digits, tmp_path):
    """--avg-pool layer: per polarity a depthwise Conv of ones and sum neurons, one step more latency per pool;
    floating point reproduces the torch SNN's levels, fixed point the integer reference's bit for bit."""
    from sfn_deploy.exporters.lava.bundle import read_bundle
    from sfn_deploy.exporters.lava.reference import integer_reference
    snn = convert(_SiluPoolNet.build(), digits.limit(300), scale=0.3, input_encoding="analog")
    assert all(s.params["bounds_neg"].numel() for s in snn.sites)          # both polarities are pooled
    folded, layer = lower(snn, "graded", "floating_pt"), lower(snn, "graded", "floating_pt", avg_pool="layer")
    assert folded.summary()["pooling_layers"] == 0 and layer.summary()["pooling_layers"] == 2
    assert layer.latency == folded.latency + 2 and layer.summary()["host_ops"] == folded.summary()["host_ops"]
    sums = [b for b in layer.blocks if b.kind == "neuron" and b.attrs.get("pool")]
    assert len(sums) == 4 and all(b.arrays["table"][-1] == b.attrs["n_pos"] for b in sums)   # level = the sum
    x = digits.x[300:330]
    ref, lv = run_with_levels(snn.graph, x)
    path = str(tmp_path / "b")
    info = export_lava(snn, path, input_abs_max=1.0, avg_pool="layer")
    assert info["pooling_layers"] == 2
    r = run_lava(path, x.numpy(), "floating_pt", record=True, timeout=300)
    for site, levels in _levels(lv, len(x)).items():
        assert np.array_equal(r["levels"][site], levels), site
    assert np.abs(r["outputs"] - ref.numpy()).max() < 1e-4
    r = run_lava(path, x.numpy(), "fixed_pt", record=True, timeout=300)
    iref = integer_reference(snn, read_bundle(path, "fixed_pt")[1]["fixed_pt"])
    out, lvi = run_with_levels(iref.graph, x)
    for site, levels in _levels(lvi, len(x)).items():
        assert np.array_equal(r["levels"][site], levels), site
    assert np.array_equal(r["outputs"], out.numpy()) and r["overflows"] == 0 and r["saturations"] == 0


def test_cli_avg_pool_layer(digits, tmp_path):
    """export/simulate --avg-pool layer on a converted model; refused on other targets and on a bundle."""
    from sfn_deploy.model_file import save
    model, bundle = str(tmp_path / "m.sfn.pt"), str(tmp_path / "m.lava")
    save(convert(_SiluPoolNet.build(), digits.limit(300), scale=0.3), model)
    r = _cli("export", "--target", "lava", model, "-o", bundle, "--avg-pool", "layer", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["pooling_layers"] == 2
    with open(os.path.join(bundle, "manifest.json")) as f:
        assert json.load(f)["avg_pool"] == "layer"
    r = _cli("simulate", model, "--data", "sklearn:digits", "--limit", "10", "--backend", "lava", "--avg-pool",
             "layer", "--per-layer", "--json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)["parity"]
    assert rows[0]["first_differing"] is None and all(row["levels_equal"] == 100.0 for row in rows[0]["layers"])
    for args, why in ((("export", "--target", "onnx", model, "-o", str(tmp_path / "m.onnx"), "--avg-pool", "layer"),
                       "--avg-pool applies to --target lava only"),
                      (("evaluate", model, "--data", "sklearn:digits", "--avg-pool", "layer"),
                       "--avg-pool applies to --backend lava only"),
                      (("simulate", bundle, "--data", "sklearn:digits", "--avg-pool", "layer"),
                       "chosen at export"),
                      (("check", model, "--target", "loihi1", "--avg-pool", "layer"), "needs a target with graded")):
        r = _cli(*args)
        assert r.returncode == 2 and why in r.stderr, r.stderr
    r = _cli("export", "--target", "lava", model, "-o", str(tmp_path / "auto.lava"), "--avg-pool", "auto", "--data",
             "sklearn:digits", "--json")                 # the form loihi2's estimate keeps on the data
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    from sfn_deploy.data import load_data
    from sfn_deploy.model_file import load
    from sfn_deploy.report import avg_pool_choice
    assert (d["avg_pool"], d["avg_pool_why"]) == avg_pool_choice(load(model), load_data("sklearn:digits"))
    assert d["pooling_layers"] == (2 if d["avg_pool"] == "layer" else 0) and "loihi2 estimate" in d["avg_pool_why"]
    r = _cli("export", "--target", "lava", model, "-o", str(tmp_path / "x.lava"), "--avg-pool", "auto")
    assert r.returncode == 2 and "--avg-pool auto needs --data" in r.stderr
    r = _cli("check", model, "--target", "loihi2", "--avg-pool", "layer", "--json")      # what that bundle places
    d = json.loads(r.stdout)
    assert d["avg_pool"] == "layer" and sum(p["op"] == "pooling layer" for p in d["layers"]) == 2


def test_the_counter_prices_exactly_the_pooling_layers_lava_builds(digits):
    """One set (sfn_deploy.pooling) for the lowering and the counter: an overlapping pooling read by a convolution
    stays on the host in Lava, so the report must not price it as a pooling layer; the global mean is one."""
    import torch
    from torch import nn

    from sfn_deploy.pooling import pooling_layers
    from sfn_deploy.simulators.counting import count_ops

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2, self.fc = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 4, 3), nn.Linear(4, 10)

        def forward(self, x):
            h = nn.functional.avg_pool2d(torch.relu(self.c1(x)), 3, 2, 1)        # 8×8 → 4×4, overlapping
            return self.fc(torch.relu(self.c2(h)).mean((2, 3)))
    torch.manual_seed(0)
    snn = convert(Net().eval(), digits.limit(200), scale=0.3)
    assert set(pooling_layers(snn.graph)) == lower(snn, "graded", "floating_pt", avg_pool="layer").pooling_layers() \
        == {"mean"}
    counts = {c.name: c for c in count_ops(snn.graph, [digits.x[:20]]).layers}
    assert counts["avg_pool2d"].pool_neurons == 0 and counts["mean"].pool_neurons == 4


def test_the_mapping_places_the_pooling_layers_lava_builds(pool_res_cat, digits, tmp_path):
    """With ``avg_pool="layer"`` the mapping places, per pooling, the sum neurons the Lava plan builds (one
    compartment each, the largest window sum as payload), one pipeline step more; a target whose payload cannot
    carry a window sum keeps the pooling folded, and says why."""
    from sfn_deploy.simulators.counting import count_ops
    from sfn_deploy.simulators.estimate import estimate, plan_target
    from sfn_deploy.targets import load_target
    from sfn_deploy.targets.mapping import POOLING_LAYER, map_network
    snn = pool_res_cat
    plan = lower(snn, "graded", "floating_pt", avg_pool="layer")
    built: dict = {}
    for b in plan.blocks:
        if b.kind == "neuron" and b.attrs.get("pool"):
            layer = b.name.removeprefix("sum_").removesuffix("__neg")
            built.setdefault(layer, []).append(b)
    counts = count_ops(snn.graph, [digits.x[300:320]])
    t = load_target("loihi2")
    folded, layered = map_network(snn.graph, counts, t), map_network(snn.graph, counts, t, avg_pool="layer")
    placed = {p.name: p for p in layered.layers if p.op == POOLING_LAYER}
    assert set(placed) == set(built) == {"avg_pool2d", "adaptive_avg_pool2d"}
    for name, p in placed.items():
        assert p.units == p.compartments == sum(b.attrs["n"] for b in built[name])
        assert p.payload_bits == max(b.attrs["n_pos"] for b in built[name]).bit_length()
    assert layered.compartments == folded.compartments + sum(p.units for p in placed.values())
    head = next(p for p in layered.layers if p.op == "linear")
    assert head.stage == folded.stages[head.name] + 2         # behind two pooling layers
    stats = {c.name: c for c in counts.layers}
    assert placed["avg_pool2d"].dest_cores == sum(p.cores for p in layered.layers
                                                  if p.op == "conv2d" and p.stage > placed["avg_pool2d"].stage
                                                  and snn.graph[p.name].inputs == ["avg_pool2d"])
    assert stats["avg_pool2d"].pool_neurons == placed["avg_pool2d"].units

    m, e = plan_target(snn.graph, counts, t)
    assert e.avg_pool["chosen"] == m.avg_pool
    stages = [len(estimate(snn.graph, counts, t, m).stages) for m in (folded, layered)]
    assert stages[1] == stages[0] + 2
    small = tmp_path / "p4.toml"                  # loihi2 with 4-bit payloads: a window sum needs more
    text = pathlib.Path(t.path).read_text()
    small.write_text(text.replace("payload_bits = { value = 24", "payload_bits = { value = 4"))
    m4, e4 = plan_target(snn.graph, counts, load_target(str(small)))
    assert m4.avg_pool == "folded" and e4.avg_pool["chosen"] == "folded"
    assert any("window sum" in b for b in e4.avg_pool["layer"]["breaks"])


def test_pooling_layer_needs_graded_spikes(pool_res_cat):
    with pytest.raises(UserError, match="channel lowering's spikes are binary"):
        lower(pool_res_cat, "channels", "floating_pt", avg_pool="layer")
    with pytest.raises(UserError, match="unknown average-pooling form"):
        lower(pool_res_cat, "graded", "floating_pt", avg_pool="pooled")


def test_pool_event_counts_compare_the_folded_form_with_a_pooling_layer(pool_res_cat, digits):
    from sfn_deploy.exporters.lava.plan import pool_event_counts
    snn = pool_res_cat
    _, lv = run_with_levels(snn.graph, digits.x[300:320])
    rows = {r["pool"]: r for r in pool_event_counts(snn, lv)}
    assert set(rows) == {"avg_pool2d", "adaptive_avg_pool2d"}
    r = rows["avg_pool2d"]                # 2×2 windows read by a 3×3 convolution to 16 channels
    assert r["fan_out"] == 16 * 9 and r["pooled_nonzero"] <= r["pre_pool_spikes"]
    assert r["folded"] == pytest.approx(r["pre_pool_spikes"] * 144)
    assert r["pooling_layer"] == pytest.approx(r["pre_pool_spikes"] + r["pooled_nonzero"] * 144)
    assert rows["adaptive_avg_pool2d"]["fan_out"] == 10


def test_validation_refuses_a_split_layer_that_does_not_add_up(pool_res_cat):
    from sfn_deploy.exporters.lava.validate import validate_plan
    plan = lower(pool_res_cat, "graded", "fixed_pt", input_abs_max=1.0)
    validate_plan(plan)
    fine = next(b for b in plan.blocks if b.attrs.get("split") and b.attrs["shift"] == 0)
    fine.attrs["shift"] = 3                    # both halves shifted: no fine group
    with pytest.raises(UserError, match="split layer"):
        validate_plan(plan)
    flt = lower(pool_res_cat, "graded", "floating_pt")
    next(b for b in flt.blocks if b.kind == "conv").attrs["split"] = True    # halves are a fixed-point construction
    with pytest.raises(UserError, match="attrs.split"):
        validate_plan(flt)


# -- the integer reference: the torch SNN as Lava's fixed point computes it (exporters/lava/reference.py) -----

class _TinyResNet:
    """Conv–ReLU on the 8-bit input, a 1×1 projection without activation (a dual site), a convolution read by a
    ReLU6 and a residual sum on the host (a neuron fed by the host), average pooling folded into the classifier."""

    @staticmethod
    def build():
        import torch
        from torch import nn

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.c1, self.c2 = nn.Conv2d(1, 8, 3, padding=1), nn.Conv2d(8, 8, 1)
                self.c3, self.fc = nn.Conv2d(8, 8, 3, padding=1), nn.Linear(8 * 4 * 4, 10)

            def forward(self, x):
                h = torch.relu(self.c1(x))
                h = nn.functional.relu6(self.c3(self.c2(h))) + h
                return self.fc(torch.flatten(nn.functional.avg_pool2d(h, 2), 1))
        torch.manual_seed(0)
        return Net().eval()


@pytest.fixture(scope="module")
def tiny_resnet(digits):
    return convert(_TinyResNet.build(), digits.limit(200), scale=0.5)


def test_integer_reference_reproduces_lava_fixed_point_bit_for_bit(tiny_resnet, digits):
    """Per-layer parity in fixed point compares Lava with the integer reference too: every spike level, every
    membrane potential and every logit equal; the reference against the float SNN shows what quantisation costs."""
    from sfn_deploy.parity import parity
    snn = tiny_resnet
    plan = lower(snn, "graded", "fixed_pt", input_abs_max=1.0)
    assert {b.attrs["polarity"] for b in plan.blocks if b.kind == "conv"} == {"analog", "pos", "neg"}
    assert any(b.attrs.get("split") for b in plan.blocks) and "hardtanh" in plan.summary()["host_ops"]
    data = digits.subset(np.arange(200, 212))
    rows = parity(snn, data, ["lava"], "torch", lava={"precision": "fixed_pt", "lowering": "graded",
                                                        "input_abs_max": 1.0})
    assert [(r.backend, r.reference) for r in rows] == [("lava", "torch"), ("lava", "integer-reference"),
                                                        ("integer-reference", "torch")]
    exact = rows[1]
    assert exact.first_differing is None and exact.compared_sites == 3
    assert exact.output_max_abs_diff == 0 and exact.prediction_agreement == 100.0
    assert all(r.levels_equal == 100.0 and r.max_pre_diff < 1e-6 for r in exact.layers)
    lava, ref = rows[0], rows[2]        # Lava against the float SNN is the integer reference against it
    assert lava.prediction_agreement == ref.prediction_agreement
    assert [r.levels_equal for r in lava.layers] == [r.levels_equal for r in ref.layers]


def test_integer_reference_uses_the_plans_integers_and_certifies_float32_exactness(tiny_resnet, digits):
    from sfn_deploy.exporters.lava.reference import integer_reference, run_reference
    snn = tiny_resnet
    plan = lower(snn, "graded", "fixed_pt", input_abs_max=1.0)
    ref = integer_reference(snn, plan)
    assert [s.name for s in ref.sites] == [s.name for s in snn.sites]       # per-layer parity pairs them by name
    for blk in plan.blocks:
        if blk.kind == "neuron":
            site = ref.graph[blk.ir[0]]
            thr, scale = np.asarray(blk.arrays["thr_pos"]), np.float32(blk.attrs["scale"])
            reach = thr < 2 ** 23             # beyond: the saturated 24-bit membrane never gets there
            bounds = site.params["bounds_pos"].numpy()
            assert np.array_equal(bounds[reach], np.float32(thr[reach]) * scale)
            assert np.all(bounds[~reach] > np.float32(2 ** 23 - 1) * scale)
        elif blk.kind == "conv":        # one convolution per synapse group, holding the plan's integers
            w = ref.graph[blk.name].params["weight"].numpy()
            assert np.array_equal(w.transpose(0, 3, 2, 1)[:, ::-1, ::-1, :], blk.arrays["weight"])
    r = run_reference(ref, digits.x[200:240])
    assert r["float32_exact"] and 0 < r["largest_sum"] < 2 ** 24
    assert set(r["levels"]) == {s.name for s in snn.sites}


def lava_matches_torch_and_the_integer_reference(snn, data):
    """Lava floating point gives the torch SNN's levels at every layer; fixed point equals the integer reference in
    every level and logit. The fixed-point parity rows, for further checks."""
    from sfn_deploy.parity import parity
    rows = parity(snn, data, ["lava"], "torch", lava={"precision": "floating_pt", "lowering": "graded"})
    assert rows[0].first_differing is None and all(r.levels_equal == 100.0 for r in rows[0].layers)
    rows = parity(snn, data, ["lava"], "torch", lava={"precision": "fixed_pt", "lowering": "graded",
                                                        "input_abs_max": 1.0})
    assert rows[1].first_differing is None and rows[1].output_max_abs_diff == 0
    return rows


class _ResidualNet:
    """Residual sums on cores: an identity shortcut from a dual (GELU) site, a strided 1×1 projection
    shortcut and a parameter-free one (strided slices, zero channels padded on: CIFAR ResNets' option A),
    each operand one or two synaptic steps behind the other."""

    @staticmethod
    def build():
        import torch
        from torch import nn

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.c1, self.c2, self.c3 = nn.Conv2d(1, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), \
                    nn.Conv2d(8, 8, 3, padding=1)
                self.c4, self.c5 = nn.Conv2d(8, 12, 3, stride=2, padding=1), nn.Conv2d(12, 12, 3, padding=1)
                self.c6, self.c7 = nn.Conv2d(12, 20, 3, stride=2, padding=1), nn.Conv2d(20, 20, 3, padding=1)
                self.down, self.fc = nn.Conv2d(8, 12, 1, stride=2), nn.Linear(20, 10)

            def forward(self, x):
                h = nn.functional.gelu(self.c1(x))
                h = torch.relu(self.c3(torch.relu(self.c2(h))) + h)
                h = torch.relu(self.c5(torch.relu(self.c4(h))) + self.down(h))
                cut = nn.functional.pad(h[:, :, ::2, ::2], (0, 0, 0, 0, 4, 4))
                h = torch.relu(self.c7(torch.relu(self.c6(h))) + cut)
                return self.fc(h.mean((2, 3)))
        torch.manual_seed(0)
        return Net().eval()


def test_residual_sums_run_on_cores_bit_for_bit(digits):
    """The three residual sums run on cores: their neurons integrate the two operands' synapses in one integer
    unit (the shortcuts through 1×1 synapses: depthwise ones, or a strided embedding of the channels), the
    earlier operand's spikes relayed to the later one's step. Floating point gives the torch SNN's levels;
    fixed point equals the integer reference in every level and logit."""
    snn = convert(_ResidualNet.build(), digits.limit(300), scale=0.3)
    for prec in ("floating_pt", "fixed_pt"):
        plan = lower(snn, "graded", prec, input_abs_max=1.0)
        summary = plan.summary()
        assert summary["residual_sums"] == 3 and summary["host_ops"] == ["gelu"], summary   # GELU: the host's
        relays = [b for b in plan.blocks if b.kind == "neuron" and b.attrs.get("relay")]
        assert len(relays) == 4 and {b.attrs["n_neg"] for b in relays} == {0}     # a dual site: 2 polarities
    data = digits.subset(np.arange(300, 316))
    rows = lava_matches_torch_and_the_integer_reference(snn, data)
    exact = rows[1]
    assert (exact.backend, exact.reference) == ("lava", "integer-reference")
    assert exact.first_differing is None and exact.output_max_abs_diff == 0
    assert all(r.levels_equal == 100.0 for r in exact.layers)
    assert rows[2].prediction_agreement >= 90


class _StemPoolResNet:
    """timm's and torchvision's ResNets after the stem: the first block's shortcut is the stem's max pooling (run
    on the host: graded spikes have no max on Loihi), so the relays of that operand take host-sent levels."""

    @staticmethod
    def build(down: bool):
        import torch
        from torch import nn

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                width = 12 if down else 8
                self.stem, self.c1 = nn.Conv2d(1, 8, 3, padding=1), nn.Conv2d(8, width, 3, padding=1)
                self.c2, self.fc = nn.Conv2d(width, width, 3, padding=1), nn.Linear(width, 10)
                self.down = nn.Conv2d(8, width, 1) if down else nn.Identity()   # ResNet-50's first block

            def forward(self, x):
                h = nn.functional.max_pool2d(torch.relu(self.stem(x)), 2)
                h = torch.relu(self.c2(torch.relu(self.c1(h))) + self.down(h))
                return self.fc(h.mean((2, 3)))
        torch.manual_seed(0)
        return Net().eval()


@pytest.mark.parametrize("down", [False, True])
def test_a_max_pooled_shortcut_is_relayed_from_the_host(digits, down):
    """The sum whose shortcut is a max pooling on the host (or a projection of it) runs on cores: the host sends
    the pooled levels into relays, which bring them to the other operand's step. Float levels = torch's; fixed =
    integer reference."""
    snn = convert(_StemPoolResNet.build(down), digits.limit(300), scale=0.3)
    plan = lower(snn, "graded", "fixed_pt", input_abs_max=1.0)
    assert plan.summary()["residual_sums"] == 1 and plan.summary()["host_ops"] == ["max_pool2d"]
    relays = [b for b in plan.blocks if b.attrs.get("relay") and b.kind == "conv"]
    host = next(b for b in plan.blocks if b.kind == "host" and "max_pool2d" in b.attrs.get("ops", []))
    assert relays and any(c["src"] == host.name and c["dst"] == relays[0].name for c in plan.connections)
    data = digits.subset(np.arange(300, 316))
    lava_matches_torch_and_the_integer_reference(snn, data)


class _InvertedResidualNet:
    """A MobileNetV2-style block: ReLU6 after the stem, the expansion and the depthwise convolution, a linear
    projection added to the block's input (the residual sum feeds a site, as the converter places one)."""

    @staticmethod
    def build():
        import torch
        from torch import nn

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.stem, self.expand = nn.Conv2d(1, 8, 3, padding=1), nn.Conv2d(8, 16, 1)
                self.dw, self.project = nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.Conv2d(16, 8, 1)
                self.fc = nn.Linear(8, 10)

            def forward(self, x):
                h = nn.functional.relu6(self.stem(x))
                e = nn.functional.relu6(self.dw(nn.functional.relu6(self.expand(h))))
                return self.fc((h + self.project(e)).mean((2, 3)))
        torch.manual_seed(0)
        return Net().eval()


def test_relu6_clips_run_in_the_neurons_and_the_inverted_residual_on_cores(digits):
    """The clips to [0, 6] run in the neurons they feed (thresholds above 6 dropped: the same levels as firing on
    the clipped value), the residual sum on cores: nothing but the input and output on the host. Floating point
    gives the torch SNN's levels; fixed point equals the integer reference in every level and logit."""
    snn = convert(_InvertedResidualNet.build(), digits.limit(300), scale=0.3, input_encoding="analog")
    plan = lower(snn, "graded", "fixed_pt", input_abs_max=1.0)
    summary = plan.summary()
    assert summary["host_ops"] == [] and summary["residual_sums"] == 1, summary
    clipped = [b for b in plan.blocks if b.kind == "neuron" and "clip" in b.attrs]
    assert len(clipped) == 3 and all(b.attrs["n_pos"] < len(b.arrays["table"]) - 1 for b in clipped)
    data = digits.subset(np.arange(300, 316))
    lava_matches_torch_and_the_integer_reference(snn, data)
    from sfn_deploy.simulators.counting import count_ops
    from sfn_deploy.targets import load_target
    from sfn_deploy.targets.mapping import map_network
    m = map_network(snn.graph, count_ops(snn.graph, [data.x]), load_target("loihi2"))   # the report: the same
    assert [h["op"] for h in m.host_work] == ["input encoding"] and len(m.clips) == 3 and m.residual_sums
    from sfn_deploy.exporters.lava.plan import _Lowering
    binary = _Lowering(snn.graph, snn.input_shape, "channels", "floating_pt", None)
    binary.analyse()
    assert not binary.clips and not binary.resums                      # graded lowering only


def test_the_mapping_places_the_residual_sums_lava_builds(digits):
    """On a graded target the report maps the residual sums as the Lava export builds them: not host work, their
    shortcut synapses one synaptic op per spike of the site operand, and the relays' neurons those of Lava's plan,
    each at its pipeline step."""
    from sfn_deploy.simulators.counting import count_ops
    from sfn_deploy.simulators.estimate import estimate
    from sfn_deploy.targets import load_target
    from sfn_deploy.targets.mapping import RELAY, SHORTCUT, map_network
    snn = convert(_ResidualNet.build(), digits.limit(300), scale=0.3)
    plan = lower(snn, "graded", "floating_pt")
    counts = count_ops(snn.graph, [digits.x[300:320]])
    stats = {c.name: c for c in counts.layers}
    m = map_network(snn.graph, counts, load_target("loihi2"))
    adds = [n.name for n in snn.graph if n.op == "add"]
    assert m.residual_sums == adds and plan.summary()["residual_sums"] == len(adds)
    assert not [h for h in m.host_work if h["layer"] in adds or h["op"] == "add"]
    relays = [p for p in m.layers if p.op == RELAY]
    built = [b for b in plan.blocks if b.kind == "neuron" and b.attrs.get("relay")]
    assert sum(p.compartments for p in relays) == sum(b.attrs["n"] for b in built)
    assert len(relays) == len({b.name.removesuffix("__neg") for b in built})       # one per step (both polarities)
    first = snn.graph[adds[0]]                 # the identity shortcut of the GELU site: one op per event
    site = next(i for i in first.inputs if snn.graph[i].op == "sfn")
    assert stats[adds[0]].skip_events == pytest.approx(stats[site].active) and stats[site].active > 0
    assert sum(p.op == SHORTCUT for p in m.layers) == 2          # the identity and the option-A shortcut
    e = estimate(snn.graph, counts, load_target("loihi2"), m)
    host = next(t for t in e.energy_terms if t.term == "host operations")
    assert host.count == pytest.approx(counts.host_ops - sum(stats[a].host_ops for a in adds))
    assert map_network(snn.graph, counts, load_target("loihi1")).residual_sums == []   # binary: on the host


def test_host_integers_round_like_the_host_encoder():
    """The op table has no rounding: the reference's rint (x + 2^23 − 2^23 per sign) and the float32 product with
    1/scale give the host encoder's integers, ties to even and the clip at ±(2^23 − 1) included."""
    import torch

    from sfn_deploy.exporters.lava.reference import LIM, host_integers
    from sfn_deploy.ir import Graph, Node
    from sfn_deploy.simulators.interpreter import run
    ties = np.arange(-6, 6) + 0.5
    x = np.concatenate([ties, [0.0, -0.0, 0.49999997, 1e-30, 2.0 ** 22 + 0.5, 2.0 ** 23 - 1.5, 2.0 ** 23, -3e7, 7e9],
                        np.random.default_rng(0).normal(0, 300, 2000)]).astype(np.float32)
    nodes: list = []

    def emit(op, inputs, shape, attrs=None, base="n"):
        nodes.append(Node(f"{base}_{len(nodes)}", op, list(inputs), dict(attrs or {}), {}, list(shape)))
        return nodes[-1].name
    for scale in (1.0, 1 / 255, 2.0 ** -14, 0.3):
        nodes[:] = [Node("x", "input", shape=[1, len(x)])]
        out = host_integers(emit, "x", [1, len(x)], scale, "q")
        got = run(Graph(nodes, out), torch.from_numpy(x)[None]).numpy()[0]
        want = np.clip(np.rint((x * np.float32(1.0 / scale)).astype(np.float64)), -LIM, LIM)   # host.py's encoder
        assert np.array_equal(got, want), scale


def test_a_one_dimensional_cnn_runs_on_cores(digits):
    """Conv1d / pooling run as their one-row 2-D forms (sfn_deploy/capture/rows.py): in Lava floating point the
    levels are the torch SNN's, in fixed point the integer reference's; only the input's row axis is host work."""
    import torch
    from torch import nn

    from sfn_deploy.data import Dataset
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv1d(8, 8, 3, padding=1), nn.BatchNorm1d(8), nn.ReLU(), nn.AvgPool1d(2),
                        nn.Conv1d(8, 8, 3, padding=1, groups=8), nn.ReLU(), nn.Conv1d(8, 16, 1), nn.ReLU(),
                        nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(16, 10)).eval()
    rows = Dataset(digits.x[:, 0], digits.y, "digits as 8 signals of length 8")      # (B, 8, 8)
    snn = convert(net, rows.limit(300), scale=0.3)
    plan = lower(snn, "graded", "fixed_pt", input_abs_max=1.0)
    assert plan.summary()["host_ops"] == ["unsqueeze"], plan.summary()
    data = rows.subset(np.arange(300, 316))
    lava_matches_torch_and_the_integer_reference(snn, data)


def test_windows_and_sequence_first_attention_run_on_lava():
    """Linear layers and sites whose batch axis holds several rows of a sample (Swin's windows, folded after the
    batch) or is not first (nn.MultiheadAttention computes sequence-first) run on cores, one sample per step:
    float levels = torch's at every site, fixed point = the integer reference (sfn_deploy.samples)."""
    import torch
    from test_samples import WindowsAndHeads

    from sfn_deploy.data import Dataset
    x = torch.randn(48, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    snn = convert(WindowsAndHeads().eval(), Dataset(x[:32], torch.zeros(32, dtype=torch.long), "random"), scale=0.3)
    plan = lower(snn, "graded", "fixed_pt", input_abs_max=4.0)
    on_cores = [snn.graph[b.ir[0]] for b in plan.blocks if b.ir and b.kind != "host"]
    linear = [n for n in on_cores if n.op == "linear"]
    assert any(n.bdim == 0 and n.shape[0] == 4 for n in linear)          # 4 windows of one sample
    assert any(n.bdim == 1 for n in linear)                              # the sequence-first in_proj
    assert {"sfn_relu", "sfn_select"} <= {n.name for n in on_cores}
    lava_matches_torch_and_the_integer_reference(snn, Dataset(x[32:], torch.zeros(16, dtype=torch.long), "random"))


def test_reference_node_takes_its_batched_inputs_batch_axis():
    """An integer-reference node whose first input is a constant (no batch axis) takes the batch axis of the
    batched input after it, not the constant's none."""
    from sfn_deploy.exporters.lava.reference import _Builder
    b = object.__new__(_Builder)
    b.nodes, b.taken, b.bdims = [], set(), {}
    c = b.emit("constant", [], [4])
    assert b.bdims[c] is None
    x = b.emit("relu", [], [3, 2, 4], bdim=1)               # a sequence-first value: batch axis 1
    assert b.bdims[b.emit("add", [c, x], [3, 2, 4])] == 1
    assert b.bdims[b.emit("mul", [c], [4])] is None          # constants only: still a constant
    assert b.bdims[b.emit("relu", [], [2, 4])] == 0
