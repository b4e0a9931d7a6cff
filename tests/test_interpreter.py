"""The interpreter's extension points: overridable hooks, typed events, registered neuron kinds, the op
table and the per-node caches of the fire rule."""
import gc

import pytest
import torch
import torch.nn as nn

from sfn_deploy import ops
from sfn_deploy.capture import capture
from sfn_deploy.errors import UserError
from sfn_deploy.ir import OPS
from sfn_deploy.neurons import NODE_CACHE, level_table, level_values, signed_table
from sfn_deploy.passes import configure, insert_sfn
from sfn_deploy.simulators import interpreter
from sfn_deploy.simulators.interpreter import (
    AnnInterpreter,
    Event,
    Observer,
    SnnInterpreter,
    register_neuron_kind,
    run,
)


def _graph():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
    x = torch.rand(8, 3) * 3
    g = insert_sfn(capture(m, x[:4]))
    for s in g.sites:
        s.attrs.update(theta_pos=1.0, theta_neg=1.0, o_max=1.0)
        configure(s, 0.5)
    return m, g, x


def test_ir_ops_is_the_op_table():
    assert {name: (spec.kind, spec.description) for name, spec in ops.TABLE.items()} == OPS
    assert all(spec.impl is not None for spec in ops.TABLE.values() if spec.kind not in ("io", "neuron"))


def test_call_op_hook_sees_every_non_neuron_op_and_changes_nothing():
    m, g, x = _graph()
    seen = []

    class Tracing(AnnInterpreter):
        def call_op(self, node, args):
            seen.append(node.op)
            return super().call_op(node, args)
    with torch.no_grad():
        assert torch.equal(Tracing(g).run(x), run(g, x, spiking=False))
        assert torch.allclose(run(g, x, spiking=False), m(x), atol=1e-6)
    assert seen == [n.op for n in g.nodes if n.kind not in ("io", "neuron")]


def test_observers_get_typed_events_with_positions_at_the_sites():
    _, g, x = _graph()
    events: list[Event] = []

    class Keep(Observer):
        def __call__(self, event):
            events.append(event)
    y = run(g, x, hook=Keep())
    assert [e.node.name for e in events] == [n.name for n in g.nodes]
    assert torch.equal(events[-1].out, y)
    for e in events:
        assert (e.position is not None) == (e.node.op == "sfn")
        assert e.t is None and not e.static and e.mbe is None
        if e.position is not None:
            assert e.extra().keys() == {"position"}
            levels = signed_table(e.node)[e.position.long()]
            assert torch.equal(e.out, level_values(e.node, levels))


def test_a_registered_neuron_kind_runs_before_the_sfn_rule(monkeypatch):
    _, g, x = _graph()
    monkeypatch.setattr(interpreter, "NEURON_KINDS", list(interpreter.NEURON_KINDS))
    monkeypatch.setattr(SnnInterpreter, "kinds", interpreter.NEURON_KINDS)
    register_neuron_kind("double", lambda node: node.op == "sfn", lambda node, args: (2 * args[0], {"mbe": {"n": 1}}))
    seen = []

    class Keep(Observer):
        def __call__(self, event):
            if event.node.op == "sfn":
                seen.append(event.mbe)
    with torch.no_grad():
        y = SnnInterpreter(g, Keep()).run(x)
    ann = AnnInterpreter(g)
    ann.fire = lambda node, args, event: 2 * args[0]        # what the kind computes, through the ANN's hook
    with torch.no_grad():
        assert torch.equal(y, ann.run(x))
    assert seen == [{"n": 1}] * len(g.sites)


def test_level_table_cache_follows_configure_and_the_node_lifetime():
    _, g, _ = _graph()
    site = g.sites[0]
    first = level_table(site)
    assert level_table(site) is first                        # cached
    configure(site, 0.25)                                    # new params: rebuilt
    again = level_table(site)
    assert again is not first and torch.equal(again, level_values(site, signed_table(site)))
    key = id(site)
    assert key in NODE_CACHE._entries
    del g, site
    gc.collect()
    assert key not in NODE_CACHE._entries


def test_unknown_op_is_named():
    _, g, x = _graph()
    node = g.nodes[1]
    with pytest.raises(NotImplementedError, match="op table"):
        ops.apply(type(node)("n", "input", [], {}, {}, [1], 0), [x], g, 1)


class _Residual(nn.Module):
    """A residual sum on cores, max-pooled spikes + conv: the counter reads the pooled spikes after the sum
    (OpCounter.kept), so the sum may write over the conv's output only."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        y = torch.relu(self.c1(x))
        y = torch.relu(nn.functional.max_pool2d(y, 3, 1, 1) + self.c2(y))
        return self.head(y.mean((2, 3)))


def _vit():
    import timm
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=32, patch_size=8,
                             embed_dim=64, depth=2, num_heads=2).eval()


@pytest.mark.parametrize("make, ops_over", [(_vit, {"gelu", "softmax", "mul", "add"}), (_Residual, {"add"})])
def test_fire_over_private_inputs_changes_no_result_and_no_shared_value(make, ops_over):
    """A site or an op with an in-place form may write its output over an input nothing else reads
    (Interpreter.private): the counting run (whose observer does not read those inputs) must give the very
    outputs, counts and levels of a run whose observer does — on a ViT whose q, k, v are views of one qkv tensor,
    and on a residual CNN whose sum's spike operand the counter reads — and leave the caller's batch alone."""
    from sfn_deploy import convert
    from sfn_deploy.data import Dataset
    from sfn_deploy.simulators.counting import OpCounter
    torch.manual_seed(0)
    m = make().eval()
    x = torch.randn(6, 3, 32, 32)
    snn = convert(m, Dataset(x, torch.zeros(6, dtype=torch.long), "r"), scale=0.2, bias_correction="off")
    g = snn.graph
    counted = OpCounter(g)
    private = interpreter.private_inputs(g, kept=counted.kept)
    assert private and all(g[g[n].inputs[k]].kind != "layout" for n, k in private.items())
    assert {s.name for s in g.sites if s.attrs.get("role") in ("q", "k", "v")}.isdisjoint(private)
    assert ops_over <= {g[n].op for n in private}     # ops with an in-place form, too
    assert make is _vit or counted.kept               # the residual sum's pooled spikes

    class Reads(OpCounter):
        reads_private_inputs = True                   # the same counter, but nothing may overwrite its input
    plain = Reads(g)
    keep = x.clone()
    counted.start_batch(len(x))
    plain.start_batch(len(x))
    with torch.no_grad():
        a = interpreter.run(g, x, hook=counted)
        b = interpreter.run(g, x, hook=plain)
    assert torch.equal(x, keep)
    assert torch.equal(a, b)
    assert [c.to_dict() for c in counted.result().layers] == [c.to_dict() for c in plain.result().layers]
    levels = interpreter.run_with_levels(g, x)[1]     # its observer reads positions only: writes over inputs
    assert all(torch.equal(levels[k], v) for k, v in interpreter.run_with_levels(g, x.clone())[1].items())


@pytest.mark.parametrize("make", [_vit, _Residual])
def test_reused_buffers_change_no_result(make, monkeypatch):
    """Released values' storage handed out again (Buffers, ops.INTO forms, a neuron's output) gives the very
    outputs, counts and levels of a run that allocates every value afresh, and is reused."""
    from sfn_deploy import convert
    from sfn_deploy.data import Dataset
    from sfn_deploy.simulators.counting import OpCounter
    torch.manual_seed(0)
    x = torch.randn(16, 3, 32, 32)
    snn = convert(make().eval(), Dataset(x, torch.zeros(16, dtype=torch.long), "r"), scale=0.2,
                  bias_correction="off")
    g = snn.graph
    seen = []
    take = interpreter.Buffers.take

    def counted_take(self, shape):
        seen.append(self)
        return take(self, shape)
    monkeypatch.setattr(interpreter.Buffers, "MIN_BYTES", 1 << 12)     # this small model's values join too
    monkeypatch.setattr(interpreter.Buffers, "take", counted_take)

    def counted_run():
        c = OpCounter(g)
        c.start_batch(len(x))
        with torch.no_grad():
            out = interpreter.run(g, x, hook=c)
        return out, [d.to_dict() for d in c.result().layers], interpreter.run_with_levels(g, x)[1]
    a = counted_run()
    assert make is _Residual or sum(b.reused for b in set(seen)) > 0     # (the CNN's shapes do not recur)
    for op in list(ops.INTO):                        # every into form off
        monkeypatch.delitem(ops.INTO, op)
    monkeypatch.setenv("SFN_BUFFER_POOL_MB", "0")       # the user's knob: no pool
    seen.clear()
    b = counted_run()
    assert sum(p.reused for p in set(seen)) == 0
    assert torch.equal(a[0], b[0]) and a[1] == b[1]
    assert a[2].keys() == b[2].keys() and all(torch.equal(a[2][k], b[2][k]) for k in a[2])


def test_buffers_keep_only_what_nothing_else_reaches():
    """A released value joins the pool only when its holder's reference was the last one and no view shares its
    storage; a kept one comes back for its shape only."""
    pool = interpreter.Buffers()
    env = {k: torch.empty(1 << 20) for k in "abcd"}
    env["a"].fill_(7.0)
    other, view = env["b"], env["c"].view(2, -1)
    for k in "abc":
        pool.give(env.pop(k))
    assert len(pool.free) == 1
    got = pool.take((2, 1 << 19))                  # another shape of the same size: the kept storage
    assert got.shape == (2, 1 << 19) and got.is_contiguous() and got._base is None and pool.reused == 1
    assert bool((got == 7.0).all())
    assert pool.take((1 << 20,)).data_ptr() not in (other.data_ptr(), view.data_ptr())   # empty: a new one
    pool.give(got)                                 # still referenced here: not kept
    assert not pool.free
    ptr, env["g"] = got.data_ptr(), got
    del got
    pool.give(env.pop("g"))                        # a storage handed out comes back
    assert pool.take((1 << 10,)).numel() == 1 << 10 and pool.reused == 1     # too small for it: a new one
    assert pool.take((3 << 18,)).data_ptr() == ptr and pool.reused == 2       # ≤ twice its size: fits
    assert len(env) == 1


def test_buffer_pool_limit_from_the_environment(monkeypatch):
    """SFN_BUFFER_POOL_MB caps what the pool keeps; a value that is not a whole number is refused by name."""
    monkeypatch.setenv("SFN_BUFFER_POOL_MB", "1")
    pool = interpreter.Buffers()
    env = {k: torch.empty(1 << 18) for k in "ab"}      # 1 MiB each
    pool.give(env.pop("a"))
    pool.give(env.pop("b"))                              # would exceed 1 MiB: not kept
    assert len(pool.free) == 1 and pool.held == 1 << 20
    for bad in ("lots", "-5", "1.5"):
        monkeypatch.setenv("SFN_BUFFER_POOL_MB", bad)
        with pytest.raises(UserError, match="SFN_BUFFER_POOL_MB"):
            interpreter.Buffers()
