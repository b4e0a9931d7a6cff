"""Target scopes (all-in prices, dense ANN engines, clocked ticks), back-test bands and the ranked planning view."""
import json

import pytest
from test_hardware import TINY, _mlp, _target

from sfn_deploy.errors import UserError
from sfn_deploy.planning import rank
from sfn_deploy.simulators.counting import count_ops
from sfn_deploy.simulators.estimate import estimate
from sfn_deploy.targets import available, expand, load_target
from sfn_deploy.targets.mapping import map_network

BAND = """
    [band]
    energy = { low = 0.5, high = 1.8, backtests = 3, source = "docs/validation.md" }
    """


def _estimate(tmp_path, body, name="t"):
    g, x = _mlp("exponential", 2)          # as test_hardware: 10 synops, 5 channel spikes, 20 + 2 compartments
    counts = count_ops(g, [x])
    t = _target(tmp_path, body, name)
    return estimate(g, counts, t, map_network(g, counts, t)), counts


def test_band_is_read_and_printed_with_the_figure(tmp_path):
    e, _ = _estimate(tmp_path, TINY + BAND)
    assert e.bands["energy"]["text"] == "×0.5–×1.8, 3 back-tests"
    assert "latency" not in e.bands
    plain, _ = _estimate(tmp_path, TINY, "u")
    assert plain.bands is None and "bands" not in plain.to_dict()


@pytest.mark.parametrize("band, why", [
    ("energy = { low = 2.0, high = 1.0, backtests = 1, source = 's' }", "0 < low <= high"),
    ("energy = { low = 0.5, high = 1.0, backtests = 0, source = 's' }", "positive integer"),
    ("energy = { low = 0.5, high = 1.0, backtests = 1 }", "must be a table"),
    ("power = { low = 0.5, high = 1.0, backtests = 1, source = 's' }", "unknown key"),
])
def test_malformed_band_names_the_field(tmp_path, band, why):
    with pytest.raises(UserError, match=f"band.*{why}"):
        _target(tmp_path, TINY + "\n[band]\n" + band)


def test_all_in_price_covers_the_other_terms(tmp_path):
    """TrueNorth-style: one measured all-in energy per synaptic event; updates, messages and static are inside it."""
    body = TINY.replace('convention = "channel"', 'convention = "channel"\n    scope = "all_in"') + """
    static_w = { value = 0.07, source = "test" }
    """
    body = body.replace('neuron_update = { value = 10.0, source = "test" }\n', "").replace(
        'spike = { value = 0.5, source = "test" }\n    [time_ns]', "[time_ns]")
    e, _ = _estimate(tmp_path, body)
    assert e.energy_j == pytest.approx(10 * 1e-12 + 17 * 1e-12)      # synops + the silent updates still priced
    assert set(e.included) == {"neuron updates, active", "spike messages", "static power"}
    assert e.unpriced == ["analog input layer MACs"] and e.energy_static_j is None


def test_dense_engine_runs_the_source_ann(tmp_path):
    e, counts = _estimate(tmp_path, """
        name = "npu"
        convention = "spike"
        spikes = "none"
        runs = "ann"
        scope = "all_in"
        [energy_pj]
        ac = { value = 0.1, source = "test" }
        mac = { value = 2.0, source = "test" }
        [time_ns]
        mac = { value = 0.5, source = "test" }
        [chip]
        static_w = { value = 1.0, source = "test" }
        """)
    assert counts.mac_ann == 20
    assert e.energy_j == pytest.approx(20 * 2.0e-12)                 # all-in: no static, no memory on top
    assert e.latency_s == pytest.approx(20 * 0.5e-9) and e.throughput_per_s == pytest.approx(1e9 / 10)
    assert set(e.included) == {"weight memory", "static power"} and e.unpriced == []


def test_dense_engine_needs_no_spikes(tmp_path):
    with pytest.raises(UserError, match="runs.*spikes"):
        _target(tmp_path, TINY.replace('spikes = "binary"', 'spikes = "binary"\n    runs = "ann"'))


def test_clocked_chip_stage_lasts_a_tick(tmp_path):
    e, _ = _estimate(tmp_path, TINY.replace("[time_ns]", "[time_ns]\n    timestep = { value = 1000.0, source = 't' }"))
    assert e.latency_s == pytest.approx(2 * (1000 + 100) * 1e-9)   # two stages of one tick, each with its barrier
    assert e.step_s == pytest.approx((1000 + 100) * 1e-9)


def test_arithmetic_snn_latency_from_time_per_op(tmp_path):
    e, counts = _estimate(tmp_path, """
        name = "acc"
        convention = "spike"
        spikes = "none"
        [energy_pj]
        ac = { value = 0.1, source = "test" }
        mac = { value = 1.0, source = "test" }
        [time_ns]
        mac = { value = 2.0, source = "test" }
        ac = { value = 1.0, source = "test" }
        """)
    syn = sum(c.synops("spike") for c in counts.layers if c.kind in ("weight", "product"))
    assert e.latency_s == pytest.approx((counts.mac_snn * 2.0 + syn * 1.0) * 1e-9)


def test_rank_puts_fitting_targets_first_then_energy():
    from types import SimpleNamespace as NS

    def plan(energy, latency, fits):
        est = NS(energy_j=energy, latency_s=latency, throughput_per_s=None, unpriced=[], proxy_figures=[], bands=None)
        return NS(estimate=est, mapping=NS(fits=fits, violations=[] if fits else [1], chips=1, cores=4), runs=None)
    rows = rank({"a": plan(5.0, 1.0, True), "b": plan(1.0, None, False), "c": plan(2.0, 3.0, True)})
    assert [r.target for r in rows] == ["c", "a", "b"] and [r.rank for r in rows] == [1, 2, 3]
    assert {r.target: r.energy_rank for r in rows} == {"b": 1, "c": 2, "a": 3}
    assert {r.target: r.latency_rank for r in rows} == {"a": 1, "c": 2, "b": None}


def test_all_means_every_shipped_target():
    assert expand(["all"]) == available()
    assert expand(["loihi2", "all", "loihi2"]) == ["loihi2", *[t for t in available() if t != "loihi2"]]
    for name in available():                      # every shipped file loads under the extended schema
        load_target(name)


@pytest.fixture(scope="module")
def digits_sfn(tmp_path_factory, digits_pt2):
    """The digits MLP converted at a fixed λ, shared by the CLI tests below."""
    from test_cli import sfn
    out = tmp_path_factory.mktemp("planning") / "m.sfn.pt"
    assert sfn("convert", digits_pt2, "--data", "sklearn:digits", "-o", out, "--scale", 0.3).returncode == 0
    return out


def test_report_target_all_ranks_every_target(digits_sfn):
    from test_cli import sfn
    r = sfn("report", digits_sfn, "--data", "sklearn:digits", "--limit", "50", "--target", "all", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    plan = doc["planning"]
    assert sorted(p["target"] for p in plan) == available()
    assert [p["rank"] for p in plan] == list(range(1, len(plan) + 1))
    fits = [p["fits"] for p in plan]
    assert fits == sorted(fits, reverse=True)       # fitting targets first


def test_weights_narrower_than_the_fixed_point_are_a_violation(tmp_path):
    g, x = _mlp()
    counts = count_ops(g, [x])
    t = _target(tmp_path, TINY + '\n[precision]\nweight_bits = { value = 4, source = "test" }\n')
    v = [v for v in map_network(g, counts, t).violations if v.rule == "weight precision (bits)"]
    assert len(v) == 1 and (v[0].limit, v[0].value) == (4, 8) and "quantise the weights to 4 bits" in v[0].fix
    t8 = _target(tmp_path, TINY + '\n[precision]\nweight_bits = { value = 8, source = "test" }\n', "t8")
    assert not [v for v in map_network(g, counts, t8).violations if v.rule == "weight precision (bits)"]


def test_multi_timestep_network_updates_every_compartment_each_step(tmp_path):
    """An IF network over T steps (as the back-tested deployments): T updates per compartment, T steps an inference."""
    import torch
    import torch.nn as nn

    from sfn_deploy.convert import convert
    from sfn_deploy.data import Dataset
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)).eval()
    data = Dataset(torch.rand(8, 1, 1, 6), torch.zeros(8, dtype=torch.long), "rand")
    g = convert(model, data, method="if", timesteps=4, quiet=True).graph
    counts = count_ops(g, data.batches(8))
    t = _target(tmp_path, TINY)
    m = map_network(g, counts, t)
    e = estimate(g, counts, t, m)
    terms = {r.term: r.count for r in e.energy_terms}
    assert terms["neuron updates, active"] + terms["neuron updates, silent"] == 4 * m.compartments
    assert e.throughput_per_s == pytest.approx(1 / (4 * e.step_s))
    stages = sum(s.ns + 100 for s in e.stages) * 1e-9
    assert e.latency_s == pytest.approx(stages + 3 * e.step_s)


def test_check_states_the_channel_lowering_cost_on_binary_targets(digits_sfn):
    from test_cli import sfn
    out = digits_sfn
    r = sfn("check", out, "--target", "loihi1", "--json")
    low = json.loads(r.stdout)["channel_lowering"]
    assert low["compartments"] > low["neurons"] > 0
    assert "binary spikes only" in sfn("check", out, "--target", "loihi1").stdout
    assert "binary spikes only" not in sfn("check", out, "--target", "loihi2").stdout
