"""Exact op counts (SPEC §5): hand-computed values and an independent MAC count."""
import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from sfn_deploy.capture import capture
from sfn_deploy.passes import configure, insert_sfn
from sfn_deploy.simulators.counting import OpCounter, count_ops
from sfn_deploy.simulators.interpreter import run, run_with_levels


def _fix_sites(g, theta=1.0, lam=1.0):
    for s in g.sites:
        s.attrs["theta_pos"] = theta
        s.attrs["theta_neg"] = theta
        s.attrs["o_max"] = 1.0
        configure(s, lam)


def test_linear_counts_by_hand():
    m = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
    with torch.no_grad():
        m[0].weight.copy_(torch.eye(4, 3))
        m[0].bias.zero_()
    x = torch.tensor([[0.4, 2.0, 7.0]])           # hidden = [0.4, 2, 7, 0] → levels [0, 2, 7, 0] (step 1)
    g = insert_sfn(capture(m, x))
    _fix_sites(g)
    c = count_ops(g, [x])
    assert c.mac_ann == 3 * 4 + 4 * 2
    assert c.mac_snn == 3 * 4                      # the analog first layer
    assert c.ac_snn == (2 + 7) * 2                  # |y|·fan-out, fan-out 2
    assert abs(c.energy_ratio() - ((18 * 0.9 + 12 * 4.6) / (20 * 4.6))) < 1e-12
    site = next(layer for layer in c.layers if layer.op == "sfn")
    assert site.spikes == 9 and site.neurons == 4 and site.firing_rate == 0.5


def test_conv_fanout_by_hand_and_against_brute_force():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(1, 1, 1, bias=False), nn.ReLU(), nn.Conv2d(1, 2, 3, padding=1, bias=False)).eval()
    with torch.no_grad():
        m[0].weight.fill_(1.0)
    x = torch.zeros(1, 1, 4, 4)
    x[0, 0, 0, 0] = 1.0        # corner: 4 output positions × 2 channels
    x[0, 0, 0, 1] = 3.0        # edge: 6 × 2
    x[0, 0, 2, 2] = 2.0        # interior: 9 × 2
    g = insert_sfn(capture(m, torch.cat([x, x])))
    _fix_sites(g)
    c = count_ops(g, [x])
    assert c.ac_snn == 1 * 8 + 3 * 12 + 2 * 18
    # brute force on random data: Σ over outputs of Σ |y| in the receptive field
    xr = torch.rand(5, 1, 4, 4) * 6
    c = count_ops(g, [xr])
    counter = OpCounter(g)
    counter.start_batch(5)
    _, levels = run_with_levels(g, xr)
    y = levels[g.sites[0].name].abs().float()
    brute = F.conv2d(y, torch.ones(2, 1, 3, 3), padding=1).sum() / 5
    assert abs(c.ac_snn - float(brute)) < 1e-3


def test_attention_products_count_the_cheaper_operand_order():
    torch.manual_seed(0)
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=8, patch_size=4,
                          in_chans=1, embed_dim=8, depth=1, num_heads=2).eval()
    x = torch.randn(3, 1, 8, 8)
    g = insert_sfn(capture(m, x))
    _fix_sites(g, theta=0.5, lam=0.5)
    _, levels = run_with_levels(g, x)
    c = {layer.name: layer for layer in count_ops(g, [x]).layers}
    qk = next(n for n in g.nodes if n.name.endswith("_qk"))
    av = next(n for n in g.nodes if n.name.endswith("_av"))
    def site(name):
        while g[name].op != "sfn":
            name = g[name].inputs[0]
        return levels[name].abs().sum().item()
    tokens, head_dim = 5, 4
    # either operand's spikes can be the events; the cheaper order over the data is counted
    q, k, p, v = site(qk.inputs[0]), site(qk.inputs[1]), site(av.inputs[0]), site(av.inputs[1])
    assert abs(c[qk.name].ac - min(q * tokens, k * tokens) / 3) < 1e-6
    assert abs(c[av.name].ac - min(p * head_dim, v * tokens) / 3) < 1e-6
    assert c[qk.name].mac_ann == 2 * tokens * tokens * 4


def test_ann_macs_match_flop_counter_plus_attention():
    torch.manual_seed(0)
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=28, patch_size=4,
                          in_chans=1, embed_dim=32, depth=2, num_heads=2).eval()
    x = torch.randn(1, 1, 28, 28)
    with FlopCounterMode(display=False) as fc:
        m(x)
    attention = 2 * 2 * 2 * 50 * 50 * 16      # blocks × products × heads × N·N·d
    g = capture(m, torch.randn(2, 1, 28, 28))
    assert count_ops(g, [x], spiking=False).mac_ann == fc.get_total_flops() / 2 + attention


def test_counts_are_per_inference_whatever_the_batching():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(4 * 13 * 13, 5)).eval()
    x = torch.rand(10, 1, 28, 28)
    g = insert_sfn(capture(m, x))
    _fix_sites(g, theta=0.3, lam=0.5)
    a = count_ops(g, [x])
    b = count_ops(g, [x[:3], x[3:7], x[7:]])
    assert abs(a.ac_snn - b.ac_snn) < 1e-6 * a.ac_snn and a.mac_ann == b.mac_ann
    # average pooling is folded: the linear layer sees every spike with fan-out 5
    _, counter_levels = run_with_levels(g, x)
    total = float(counter_levels[g.sites[0].name][..., :26, :26].abs().sum()) / 10 * 5
    assert abs(a.ac_snn - total) < 1e-6 * total


def test_result_can_be_read_twice():
    m = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
    x = torch.rand(4, 3) * 3
    g = insert_sfn(capture(m, x))
    _fix_sites(g)
    counter = OpCounter(g)
    counter.start_batch(4)
    run(g, x, hook=counter)
    a, b = counter.result(), counter.result()
    assert a.ac_snn == b.ac_snn and a.mac_ann == b.mac_ann == 20


def test_max_pooling_of_signed_spikes_is_followed():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(1, 2, 3), nn.GELU(), nn.MaxPool2d(2), nn.Conv2d(2, 3, 3, padding=1)).eval()
    x = torch.randn(5, 1, 10, 10) * 2
    g = insert_sfn(capture(m, x))
    (site,) = g.sites
    _fix_sites(g, theta=0.4, lam=0.3)
    assert site.params["bounds_neg"].numel()                 # GELU dips below 0: a dual site
    conv = [n for n in g.nodes if n.op == "conv2d"][1]
    _, levels = run_with_levels(g, x)
    values = level_values_of(site, levels[site.name])
    pooled = F.max_pool2d(values, 2)                          # what the second conv really receives
    lv = F.max_pool2d(levels[site.name].float(), 2)           # its levels: the max picks the same element
    assert torch.equal(level_values_of(site, lv.long()), pooled)
    brute = float(F.conv2d(lv.abs(), torch.ones(3, 2, 3, 3), padding=1).sum()) / 5
    c = {layer.name: layer for layer in count_ops(g, [x]).layers}
    assert c[conv.name].input == "spikes" and abs(c[conv.name].ac - brute) < 1e-6 * brute
    # positions read back from the pooled values equal pooling the positions themselves
    from sfn_deploy.simulators import counting
    counter = counting.OpCounter(g)
    assert counter._recoverable(site) is not None
    counter._grids[site.name] = None
    counter.start_batch(5)
    run(g, x, hook=counter)
    slow = {layer.name: layer for layer in counter.result().layers}
    for field in ("ac", "ac_event", "ac_channel"):
        assert getattr(slow[conv.name], field) == getattr(c[conv.name], field)


def level_values_of(site, level):
    from sfn_deploy.neurons import level_values
    return level_values(site, level)


def test_counts_are_the_same_with_and_without_the_fused_loop_and_histograms(monkeypatch):
    """The fused fire loop, runtime histograms and skipped positions change no count."""
    from sfn_deploy.simulators import counting
    torch.manual_seed(0)
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=8, patch_size=4,
                          in_chans=1, embed_dim=32, depth=1, num_heads=2).eval()
    x = torch.randn(40, 1, 8, 8)
    g = insert_sfn(capture(m, x))
    _fix_sites(g, theta=0.5, lam=0.3)
    cnn = nn.Sequential(nn.Conv2d(1, 4, 3), nn.GELU(), nn.MaxPool2d(2), nn.Conv2d(4, 4, 3), nn.ReLU(),
                        nn.AvgPool2d(2), nn.Flatten(), nn.Linear(4 * 5 * 5, 5)).eval()
    xc = torch.randn(30, 1, 28, 28)
    gc = insert_sfn(capture(cnn, xc))
    _fix_sites(gc, theta=0.4, lam=0.3)
    for graph, data in ((g, x), (gc, xc)):
        fast = count_ops(graph, [data[:17], data[17:]])
        monkeypatch.setattr(counting.OpCounter, "wants_hist", False)    # positions only, bincount here
        monkeypatch.setattr(counting, "_position_free", lambda graph: set())
        monkeypatch.setenv("SFN_NATIVE", "0")
        slow = count_ops(graph, [data[:17], data[17:]])
        monkeypatch.undo()
        assert [c.to_dict() for c in fast.layers] == [c.to_dict() for c in slow.layers]
    # the ViT's sites all feed linear layers and products: no position tensor is written for them;
    # the CNN's feed convolutions and pooling: all are kept
    assert counting._position_free(g) == {s.name for s in g.sites}
    assert counting._position_free(gc) == set()


def test_run_hands_histograms_and_skips_positions_only_when_asked():
    m = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
    x = torch.rand(5000, 3) * 3
    g = insert_sfn(capture(m, x[:4]))
    _fix_sites(g)
    site = g.sites[0].name
    seen = {}

    def plain(node, args, out, extra):
        if node.name == site:
            seen["plain"] = dict(extra)

    class Asking:
        wants_hist, skip_positions = True, {site}

        def __call__(self, node, args, out, extra):
            if node.name == site:
                seen["asking"] = dict(extra)
    a, b = run(g, x, hook=plain), run(g, x, hook=Asking())
    assert torch.equal(a, b)
    assert set(seen["plain"]) == {"position"} and set(seen["asking"]) == {"hist"}
    assert torch.equal(seen["asking"]["hist"], torch.bincount(seen["plain"]["position"].reshape(-1),
                                                              minlength=seen["asking"]["hist"].numel()))


def test_add_with_unit_alpha_is_bit_identical():
    from sfn_deploy.ir import Node
    from sfn_deploy.ops import apply as _op
    a, b = torch.randn(100), torch.randn(100)
    b[0] = -0.0
    for op, alpha, ref in (("add", 1, a + 1 * b), ("sub", 1, a - 1 * b), ("add", 2, a + 2 * b),
                           ("add", 1.0, a + 1.0 * b)):
        out = _op(Node("n", op, ["a", "b"], {"alpha": alpha}, {}, [100], 0), [a, b], None, 1)
        assert torch.equal(out.view(torch.int32), ref.view(torch.int32))
    i, j = torch.arange(5, dtype=torch.int32), torch.ones(5, dtype=torch.bool)
    assert _op(Node("n", "add", ["a", "b"], {}, {}, [5], 0), [i, j], None, 1).dtype == (i + 1 * j).dtype


class _PadThenConv(torch.nn.Module):
    """conv → ReLU → zero padding → conv, or the same with the padding inside the second convolution."""

    def __init__(self, explicit: bool):
        super().__init__()
        torch.manual_seed(0)
        self.c1 = torch.nn.Conv2d(1, 4, 3)
        self.c2 = torch.nn.Conv2d(4, 3, 3, padding=0 if explicit else 1)
        self.explicit = explicit

    def forward(self, x):
        h = torch.relu(self.c1(x))
        if self.explicit:
            h = torch.roll(torch.nn.functional.pad(h, (1, 1, 1, 1)), shifts=0, dims=2)
        return self.c2(h).flatten(1)


def test_spikes_are_followed_through_zero_padding():
    """An explicit zero pad (a ResNet's channel-padding shortcut, Swin's window padding) adds silent positions:
    the counts equal those of the same network with the padding inside the convolution."""
    from sfn_deploy.convert import convert
    from sfn_deploy.data import Dataset
    from sfn_deploy.evaluation import measure
    x = torch.rand(16, 1, 8, 8)
    data = Dataset(x, torch.zeros(16, dtype=torch.long), "random")
    counts = []
    for explicit in (True, False):
        g = convert(_PadThenConv(explicit), data, scale=0.5).graph
        assert any(n.op == "pad" for n in g.nodes) == explicit
        _, counter = measure(g, data)
        counts.append(counter.result())
    assert counts[0].ac_snn == counts[1].ac_snn > 0
    assert counts[0].mac_snn == counts[1].mac_snn


def test_every_op_has_a_counting_entry_or_is_known_to_need_none():
    """The counter dispatches by op (or op kind): an op either has a counter, which adds to its layer's counts, or a
    follower, which carries its input's spikes; a new op in the op table must be given one or be added here."""
    from sfn_deploy.ops import TABLE
    from sfn_deploy.simulators import counting
    counted, followed = counting._COUNTERS, counting._FOLLOWERS
    neither = {op for op, spec in TABLE.items() if not {op, spec.kind} & set(counted) and op not in followed}
    # io ops cost nothing; cat ends the spikes (its consumer counts MACs); mbe_neuron is counted from event.mbe
    assert neither == {"input", "constant", "cat", "mbe_neuron"}
    assert all(TABLE[op].kind in ("layout", "pool") for op in counting._FOLLOWERS)
    assert not set(counting._FOLLOWERS) & set(counting._COUNTERS)


def test_torch_path_counts_are_exact_past_float32(monkeypatch):
    """The torch path (the GPU's) multiplies spike sums by fan-outs in float64: with Σ|y| over a batch times a
    conv's fan-out past 2^24 a float32 product rounds, and its counts left the compiled loop's exact ones."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 509, 3, padding=1)).eval()
    x = torch.rand(64, 3, 6, 6) + 0.5
    g = insert_sfn(capture(m, x[:2]))
    _fix_sites(g, theta=0.01, lam=0.05)          # nearly every element at a high level
    levels = run_with_levels(g, x)[1]
    big = max(float(v.abs().sum(0).max()) for v in levels.values()) * 9 * 509
    assert big > 2 ** 24                         # the case the test is about
    fast = count_ops(g, [x])
    monkeypatch.setenv("SFN_NATIVE", "0")
    slow = count_ops(g, [x])
    assert [c.to_dict() for c in fast.layers] == [c.to_dict() for c in slow.layers]


def test_average_pooling_both_forms_are_counted_and_a_graded_target_prices_the_cheaper():
    """Per average pooling of a site's spikes read by weight layers, the counter also counts the pooling-layer
    form (events into the layer = the non-zero spikes, one per disjoint window; its readers get one event per
    non-zero window sum and polarity); a graded event target prices both and keeps the cheaper in its totals,
    a binary target keeps the folded form."""
    from sfn_deploy.exporters.lava.plan import pool_event_counts
    from sfn_deploy.simulators.estimate import plan_target
    from sfn_deploy.targets import load_target
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2), nn.Conv2d(4, 6, 3, padding=1),
                      nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3)).eval()
    x = torch.rand(16, 1, 8, 8)
    g = insert_sfn(capture(m, x))
    _fix_sites(g, theta=0.5, lam=0.25)
    c = count_ops(g, [x])
    layers = {lc.name: lc for lc in c.layers}
    pools = [lc for lc in c.layers if lc.pool_neurons]
    assert [p.op for p in pools] == ["avg_pool2d", "adaptive_avg_pool2d"]

    class _Model:                      # what pool_event_counts reads of a converted model
        graph, input_shape = g, [1, 8, 8]
    _, lv = run_with_levels(g, x)
    rows = {r["pool"]: r for r in pool_event_counts(_Model, lv)}
    for p in pools:
        r = rows[p.name]
        assert p.pool_events == pytest.approx(r["pre_pool_spikes"])
        assert p.pool_active == pytest.approx(r["pooled_nonzero"])
    head = layers["linear"]                    # reads the global pooling: fan-out 3, exact
    assert head.ac_event_layer == pytest.approx(rows["adaptive_avg_pool2d"]["pooled_nonzero"] * 3)
    assert head.ac_event == pytest.approx(rows["adaptive_avg_pool2d"]["pre_pool_spikes"] * 3)
    for name in ("loihi2", "loihi1"):
        t = load_target(name)
        m, e = plan_target(g, c, t)
        if name == "loihi1":
            assert e.avg_pool is None and m.avg_pool == "folded"    # binary spikes cannot carry window sums
            continue
        a = e.avg_pool
        assert a["poolings"] == ["avg_pool2d", "adaptive_avg_pool2d"] and a["folded"]["synops"] == pytest.approx(
            sum(lc.ac_event for lc in c.layers if lc.ac_event_layer))
        syn = next(term for term in e.energy_terms if term.term == "synaptic ops")
        base = c.synops("event")
        chosen = a["chosen"]
        assert chosen == m.avg_pool == a["priced"]
        assert chosen == ("layer" if a["layer"]["total_j"] < a["folded"]["total_j"] else "folded")
        assert e.energy_j == a[chosen]["total_j"]
        assert syn.count == pytest.approx(base if chosen == "folded" else base - a["folded"]["synops"]
                                          + a["layer"]["synops"])


class _EdgePad(nn.Module):
    def __init__(self, mode: str):
        super().__init__()
        self.mode = mode

    def forward(self, x):
        return F.pad(x, (1, 2, 2, 1), self.mode)


def _one_site_counted(layers, shape: tuple):
    """conv 1×1 of ones → ReLU (one site, θ = λ = 1: the levels are the inputs' integers) → ``layers``, counted
    on 6 random inputs in [0, 6): the graph, the counts per inference, and |level| of the site."""
    m = nn.Sequential(nn.Conv2d(1, 1, 1, bias=False), nn.ReLU(), *layers).eval()
    with torch.no_grad():
        m[0].weight.fill_(1.0)
    x = torch.rand(6, 1, *shape, generator=torch.Generator().manual_seed(0)) * 6
    g = insert_sfn(capture(m, x[:2]))
    _fix_sites(g)
    _, levels = run_with_levels(g, x)
    return g, count_ops(g, [x]), levels[g.sites[0].name].abs().float()


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_spikes_are_followed_through_padding_that_copies_the_edge(mode):
    """Reflect / replicate / circular padding copies spikes to the border (TResNet's anti-aliasing, circular convs),
    positions included: through a folded 2×2 average pooling, each spike carries its pooled position's fan-out in
    the next convolution (Σ over outputs of the window sums of |level|)."""
    g, c, level = _one_site_counted([_EdgePad(mode), nn.AvgPool2d(2), nn.Conv2d(1, 2, 2, bias=False)], (5, 5))
    assert any(n.op == "pad" and n.attrs.get("mode") == mode for n in g.nodes)
    y = F.pad(level, (1, 2, 2, 1), mode)
    brute = F.conv2d(F.avg_pool2d(y, 2) * 4, torch.ones(2, 1, 2, 2)).sum() / 6
    assert float(brute) > 0 and abs(c.ac_snn - float(brute)) < 1e-3


def test_spikes_are_followed_through_nearest_upsampling():
    """Each copy of a spike is an event of the next layer: Σ |level| of the upsampled map times the fan-out."""
    _, c, level = _one_site_counted([nn.Upsample(size=(7, 5)), nn.Conv2d(1, 3, 1, bias=False)], (3, 3))
    brute = 3 * F.interpolate(level, size=(7, 5)).sum() / 6
    assert float(brute) > 0 and abs(c.ac_snn - float(brute)) < 1e-3
