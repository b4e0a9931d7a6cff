"""Targets as data, core mapping, energy/latency estimates: hand-computed on tiny networks."""
import textwrap

import pytest
import torch
import torch.nn as nn

from sfn_deploy.capture import capture
from sfn_deploy.errors import UserError
from sfn_deploy.neurons import fire_levels
from sfn_deploy.passes import configure, insert_sfn
from sfn_deploy.simulators.counting import count_ops
from sfn_deploy.simulators.estimate import estimate
from sfn_deploy.targets import available, load_target
from sfn_deploy.targets.mapping import map_network


def _mlp(fire="sformer", levels=8):
    """Linear(3→4) → ReLU → Linear(4→2) whose hidden layer copies the input (levels checkable by hand)."""
    m = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
    with torch.no_grad():
        m[0].weight.copy_(torch.eye(4, 3))
        m[0].bias.zero_()
    x = torch.tensor([[0.4, 2.0, 7.0]])
    g = insert_sfn(capture(m, x))
    for s in g.sites:
        s.attrs.update(theta_pos=1.0, theta_neg=1.0, o_max=1.0, fire=fire, M=levels,
                       levels=fire_levels(levels, fire))
        configure(s, 1.0)
    return g, x


def _target(tmp_path, body: str, name="tiny"):
    p = tmp_path / f"{name}.toml"
    p.write_text(textwrap.dedent(body))
    return load_target(str(p))


TINY = """
    name = "tiny"
    convention = "channel"
    spikes = "binary"
    [energy_pj]
    synop = { value = 1.0, source = "test" }
    neuron_update = { value = 10.0, source = "test" }
    neuron_update_inactive = { value = 1.0, source = "test" }
    spike = { value = 0.5, source = "test" }
    [time_ns]
    synop = { value = 1.0, source = "test" }
    neuron_update = { value = 2.0, source = "test" }
    neuron_update_inactive = { value = 1.0, source = "test" }
    spike = { value = 0.5, source = "test" }
    barrier = { value = 100.0, source = "test" }
    [core]
    neurons = { value = 5, source = "test" }
    synapse_bits = { value = 256, source = "test" }
    [chip]
    cores = { value = 2, source = "test" }
    """


def test_conventions_by_hand():
    # exponential M=2: table 0,1,2,4,8; hidden [0.4, 2, 7, 0] → levels [0, 2, 4, 0], k = [0, 2, 3, 0]
    g, x = _mlp("exponential", 2)
    c = count_ops(g, [x])
    assert c.synops("spike") == (2 + 4) * 2 == c.ac_snn
    assert c.synops("event") == 2 * 2
    assert c.synops("channel") == (2 + 3) * 2
    site = next(layer for layer in c.layers if layer.op == "sfn")
    assert (site.spikes, site.active, site.channel_spikes) == (6, 2, 5)
    assert site.level_hist == {0: 2, 2: 1, 4: 1}
    assert [s["stage"] for s in c.per_stage()] == [1, 2]


def test_event_and_channel_counts_through_a_pool_match_brute_force():
    torch.manual_seed(0)
    import torch.nn.functional as F

    from sfn_deploy.simulators.interpreter import run_with_levels
    m = nn.Sequential(nn.Conv2d(1, 2, 3), nn.GELU(), nn.AvgPool2d(2), nn.Conv2d(2, 3, 3, padding=1)).eval()
    x = torch.randn(6, 1, 10, 10) * 2
    g = insert_sfn(capture(m, x))
    (site,) = g.sites
    assert g[site.inputs[0]].op == "gelu"           # spikes, then the pool folded into the next conv
    site.attrs.update(theta_pos=0.5, theta_neg=0.1, fire="exponential", M=2, levels=fire_levels(2, "exponential"))
    configure(site, 0.5)
    assert site.params["bounds_neg"].numel()        # GELU dips below 0: both polarities fire
    c = {layer.name: layer for layer in count_ops(g, [x[:4], x[4:]]).layers}
    _, levels = run_with_levels(g, x)
    lv = levels[site.name]
    k = torch.searchsorted(site.params["table"], lv.abs()).float()
    conv = [n for n in g.nodes if n.op == "conv2d"][1]
    for field, t in (("ac", lv.abs().float()), ("ac_event", (lv != 0).float()), ("ac_channel", k)):
        brute = float(F.conv2d(F.avg_pool2d(t, 2) * 4, torch.ones(3, 2, 3, 3), padding=1).sum()) / 6
        assert abs(getattr(c[conv.name], field) - brute) < 1e-6 * max(brute, 1)
    assert c[site.name].channel_spikes == pytest.approx(float(k.sum()) / 6)


def test_shipped_targets_load_and_every_figure_has_a_source():
    assert {"cmos45", "cmos45_fp16", "cmos45_int8", "cmos45_int32", "loihi1", "loihi2"} <= set(available())
    for name in available():
        t = load_target(name)
        for section in t.figures.values():
            for fig in section.values():
                assert fig.source.strip()
    assert load_target("cmos45").get("energy_pj", "ac") == 0.9
    assert load_target("loihi1").get("core", "neurons") == 1024
    assert load_target("loihi2").get("chip", "synapses") == 120_000_000
    assert load_target("loihi2").figure("energy_pj", "synop").evidence == "proxy"


@pytest.mark.parametrize("body, field", [
    ("[energy_pj]\nsynop = 23.6\n", "energy_pj.synop"),                                   # no source
    ("[energy_pj]\nsynop = { value = 1, source = 's' }\nsynopp = { value = 1, source = 's' }\n",
     "energy_pj.synopp"),                                                                  # typo
    ("[energy_pj]\nsynop = { value = 1, source = 's' }\n[core]\nneurons = { value = 1.5, source = 's' }\n",
     "core.neurons"),                                                                      # not an integer
    ("[energy_pj]\nsynop = { value = -1, source = 's' }\n", "energy_pj.synop"),            # negative
    ("", "energy_pj.synop"),                                                               # spiking, unpriced
])
def test_malformed_target_names_the_field(tmp_path, body, field):
    head = 'name = "bad"\nconvention = "event"\nspikes = "graded"\n'
    p = tmp_path / "bad.toml"
    p.write_text(head + body)
    with pytest.raises(UserError, match=field.replace(".", r"\.")):
        load_target(str(p))


def test_bad_convention_and_bad_toml(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('name = "c"\nconvention = "spikes"\nspikes = "none"\n')
    with pytest.raises(UserError, match="convention"):
        load_target(str(p))
    p.write_text("name = ")
    with pytest.raises(UserError, match="not valid TOML"):
        load_target(str(p))
    with pytest.raises(UserError, match="unknown target 'nope'"):
        load_target("nope")


def test_mapping_by_hand(tmp_path):
    g, x = _mlp("exponential", 2)          # 4 thresholds, positive branch only (the ReLU was absorbed)
    counts = count_ops(g, [x])
    m = map_network(g, counts, _target(tmp_path, TINY))
    first, second = m.layers
    assert (first.units, first.channels, first.compartments) == (4, 4, 20)
    assert (first.synapses, first.synapse_bits) == (12, 96)      # 3·4 connections × 8-bit weights (default)
    assert first.cores == 4 and first.binding == "neurons per core"   # 20 / 5 > 96 / 256
    assert first.output == "spikes" and second.output == "network output"
    # binary spikes: each of the 4 channels of the hidden site is an axon with its own weight
    assert (second.input_channels, second.fan_in, second.synapses) == (4, 16, 32)
    assert (second.compartments, second.cores, second.binding) == (2, 1, "none (fits one core)")
    assert first.dest_cores == 1
    assert m.cores == 5 and m.chips == 3 and m.chip_binding == "cores per chip"
    assert m.fits and "input axons per core" in m.unchecked
    assert any(h["op"] == "input encoding" for h in m.host_work)


def test_all_violations_reported_at_once(tmp_path):
    g, x = _mlp("exponential", 2)
    body = TINY.replace("    [chip]", '    fan_in = { value = 2, source = "test" }\n    [chip]')
    m = map_network(g, count_ops(g, [x]), _target(tmp_path, body))
    assert not m.fits
    got = sorted((v.layer, v.rule, v.limit, v.value) for v in m.violations)
    names = [n.name for n in g.nodes if n.op == "linear"]
    assert got == sorted([(names[0], "fan-in per neuron", 2, 3), (names[1], "fan-in per neuron", 2, 16)])
    assert all("split" in v.fix for v in m.violations)
    assert m.to_dict()["violations"][0].keys() >= {"layer", "rule", "limit", "value", "fix"}


def test_graded_payload_limit(tmp_path):
    g, x = _mlp("exponential", 8)          # top level 2^15 needs 16 bits
    body = """
    name = "g"
    convention = "event"
    spikes = "graded"
    [energy_pj]
    synop = { value = 1.0, source = "t" }
    [core]
    neurons = { value = 100, source = "t" }
    [chip]
    cores = { value = 1, source = "t" }
    [precision]
    payload_bits = { value = 8, source = "t" }
    """
    m = map_network(g, count_ops(g, [x]), _target(tmp_path, body, "g"))
    (v,) = m.violations
    assert (v.rule, v.limit, v.value) == ("graded spike payload (bits)", 8, 16) and "lower M" in v.fix


def test_cmos45_estimate_by_hand():
    g, x = _mlp()                          # sformer M=8: levels [0, 2, 7, 0], fan-out 2
    counts = count_ops(g, [x])
    t = load_target("cmos45")
    e = estimate(g, counts, t, map_network(g, counts, t))
    terms = {r.term: r for r in e.energy_terms}
    assert terms["synaptic ops"].count == 18 and terms["MACs"].count == 12
    assert terms["weight memory"].count == (2 * 2 + 12) * 32          # one 32-bit read per event and MAC
    assert e.energy_without_memory_j == pytest.approx((18 * 0.9 + 12 * 4.6) * 1e-12)
    assert e.energy_j == pytest.approx((18 * 0.9 + 12 * 4.6 + 16 * 32 * 0.15625) * 1e-12)
    assert e.ann.target_j == pytest.approx(20 * 4.6e-12)
    assert e.ann.int8_j == pytest.approx(20 * 0.23e-12)
    assert e.ann.int8_with_memory_j == pytest.approx((20 * 0.23 + 20 * 8 * 0.15625) * 1e-12)
    assert e.unpriced == [] and e.latency_s is None and e.cores == 0
    assert e.traffic.synaptic_reads == 2 * 2 + 12 and e.traffic.message_bits == 0
    assert e.pipeline_steps == 2


def test_spiking_estimate_and_latency_by_hand(tmp_path):
    g, x = _mlp("exponential", 2)          # channel spikes 5 (k = 2 and 3), fan-out 2 → 10 synops
    counts = count_ops(g, [x])
    t = _target(tmp_path, TINY)
    e = estimate(g, counts, t, map_network(g, counts, t))
    terms = {r.term: r for r in e.energy_terms}
    assert terms["synaptic ops"].count == 10
    # compartments: 4 integrators + 16 channels (5 fire) in layer 1, 2 integrators in layer 2
    assert terms["neuron updates, active"].count == 5
    assert terms["neuron updates, silent"].count == 20 - 5 + 2
    assert terms["spike messages"].count == 5
    assert e.energy_j == pytest.approx((10 * 1 + 5 * 10 + 17 * 1 + 5 * 0.5) * 1e-12)
    assert {"analog input layer MACs", "static power"} <= set(e.unpriced)
    # per core: layer 1 (4 cores) (5·2 + 15·1 + 5·0.5)/4 = 6.875 ns; layer 2 (1 core) 10·1 + 2·1 = 12 ns
    assert e.step_s == pytest.approx((12 + 100) * 1e-9)
    assert e.latency_s == pytest.approx((6.875 + 100 + 12 + 100) * 1e-9)
    assert e.throughput_per_s == pytest.approx(1e9 / 112)
    assert e.traffic.synaptic_reads == 10 + 3 * 4        # channel reads + the analog layer's MACs
    assert e.traffic.message_bits == 5                   # one bit per binary channel spike
    # the JSON form: the keys of `report --json` in their order; keys some rows lack are left out, not null
    d = e.to_dict()
    assert list(d) == ["target", "convention", "cores", "chips", "energy_j", "energy_dynamic_j", "energy_static_j",
                       "energy_streaming_j", "energy_without_memory_j", "energy_terms", "priced", "unpriced",
                       "proxy_figures", "figure_caveats", "latency_s", "step_s", "throughput_per_s", "stages", "timed",
                       "untimed", "ann", "snn_over_int8_ann", "snn_over_int8_ann_baseline", "traffic", "pipeline_steps",
                       "layers", "layers_note"]
    assert [t["term"] for t in d["energy_terms"] if "unit" in t] == ["static power"]
    assert list(d["energy_terms"][-1])[:3] == ["term", "count", "unit"]
    assert "target_with_memory_j" not in d["ann"] and d["stages"][0].keys() == {"stage", "ns"}
    assert [("synaptic_reads" in r) for r in d["layers"]] == [True, True]
    assert e["energy_j"] == d["energy_j"]          # scripts written against the dicts still read keys


def test_channel_decomposition_cost_by_hand():
    from sfn_deploy.model_file import ConvertedModel
    from sfn_deploy.report import ChannelCost, channel_cost
    g, x = _mlp("exponential", 2)          # hidden site: 4 units, 4 positive channels; 4→2 layer: 8 connections
    cd = channel_cost(ConvertedModel(g, [3]), count_ops(g, [x]))
    assert cd == ChannelCost(neurons_graded=4, neurons_channels=16, synapses_graded=12 + 8,
                             synapses_channels=12 + 8 * 4)
