"""The op table declares every IR node's inputs, attributes and parameters (sfn_deploy/ops.py): every op has a
declaration, the implementations read only what is declared, capture and every conversion method write only
declared keys of the declared types, saved files round-trip, the generic checks refuse what the declarations
exclude, and docs/ops.md is the table as it is."""
import copy
import importlib.util
import inspect
import os
import re

import pytest
import timm
import torch
import torch.nn as nn
from conftest import MODELS, ROOT
from test_capture import ZooOps, cnn, small_vit

from sfn_deploy import convert, load_model
from sfn_deploy.capture import capture
from sfn_deploy.data import Dataset
from sfn_deploy.ir import ANNOTATIONS, GraphError, Node, check_declared, validate_graph
from sfn_deploy.model_file import load, save
from sfn_deploy.ops import TABLE, Attr, Param, Type


def _all_declared(graph) -> None:
    for n in graph.nodes:
        check_declared(f"node {n.name!r} ({n.op})", n)


# ---------------------------------------------------------------- the table itself

def test_every_op_has_a_declaration():
    assert len(TABLE) >= 40
    for name, spec in TABLE.items():
        assert isinstance(spec.inputs, str), name
        assert all(isinstance(a, Attr) and a.meaning for a in spec.attrs.values()), name
        assert all(isinstance(p, Param) for p in spec.params.values()), name
        assert all(a.type.says() for a in spec.attrs.values())
    assert all(isinstance(a, Attr) and a.meaning and not a.required for a in ANNOTATIONS.values())


def test_implementations_read_only_declared_keys_and_index_only_required_ones():
    """A static read of each torch implementation: ``attrs["k"]`` / ``a["k"]`` must be a required attr,
    ``.get("k")`` a declared one; the same for params."""
    for name, spec in TABLE.items():
        if spec.impl is None:
            continue
        src = inspect.getsource(spec.impl)          # (add/sub read alpha and other through helpers: .get/optional)
        for table, words in ((spec.attrs, r"(?:attrs|\ba)"), (spec.params, r"(?:params|\bp)")):
            for key in re.findall(words + r'\["(\w+)"\]', src):
                assert key in table and table[key].required, (name, key)
            for key in re.findall(words + r'\.get\("(\w+)"', src):
                assert key in table, (name, key)


def test_the_type_language():
    assert Type("int[2]").accepts([1, 2]) and not Type("int[2]").accepts([1]) and not Type("int[2]").accepts(2)
    assert not Type("int").accepts(True) and not Type("int").accepts(1.0)
    assert Type("float").accepts(1) and not Type("float").accepts(float("nan"))
    assert not Type("float").accepts(float("inf")) and Type("float | inf").accepts(float("inf"))
    assert Type("shape").accepts(["B", 3, -1, "B*4"]) and not Type("shape").accepts(["C", 3])
    assert not Type("shape").accepts(["B*0"])
    assert Type("'relu' | None").accepts(None) and not Type("'relu' | None").accepts("gelu")
    assert Type("'a' | 'b'").says() == "'a' or 'b'"
    assert Type("int[2]").says() == "a list of 2 integers"
    with pytest.raises(ValueError):
        Type("integer")


# ---------------------------------------------------------------- capture writes only declared attrs

def _bundled():
    names = sorted(f for f in os.listdir(MODELS) if f.endswith(".pt2"))
    cifar = os.path.join(MODELS, "cifar")
    names += sorted(os.path.join("cifar", f) for f in os.listdir(cifar) if f.endswith(".pt2"))
    return names


@pytest.mark.parametrize("name", _bundled())
def test_capture_of_bundled_examples_is_declared(name):
    model, _ = load_model(os.path.join(MODELS, name))
    g = capture(model)
    _all_declared(g)
    validate_graph(g)


@pytest.mark.parametrize("make,shape", [(ZooOps, (2, 3, 8, 8)), (cnn, (2, 1, 28, 28)), (small_vit, (2, 1, 28, 28))])
def test_capture_of_the_operator_families_is_declared(make, shape):
    g = capture(make().eval(), torch.randn(*shape))
    _all_declared(g)
    validate_graph(g)


# ---------------------------------------------------------------- every method writes only declared keys

def _data(shape, n=48, classes=4):
    g = torch.Generator().manual_seed(0)
    return Dataset(torch.rand(n, *shape, generator=g), torch.randint(0, classes, (n,), generator=g), "random")


def _tiny_cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(),
                         nn.Linear(16, 4)).eval()


def _tiny_vit():
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=4, img_size=8, patch_size=4,
                             in_chans=1, embed_dim=16, depth=1, num_heads=2).eval()


def _round_trip(snn, tmp_path):
    path = str(tmp_path / "m.sfn.pt")
    save(snn, path)
    back = load(path)
    assert [(n.name, n.op, n.inputs, n.attrs, sorted(n.params)) for n in back.graph.nodes] == \
        [(n.name, n.op, n.inputs, n.attrs, sorted(n.params)) for n in snn.graph.nodes]
    return back


@pytest.mark.parametrize("make,method,kw", [
    (_tiny_cnn, "sfn", {"scale": 0.5}),
    (_tiny_cnn, "if", {"timesteps": 4}),
    (_tiny_cnn, "mtn", {"timesteps": 4, "v0": 0.5}),
    (_tiny_cnn, "ecmt", {"timesteps": 4}),
    (_tiny_cnn, "pmsm", {"epochs": 0.1}),
    (_tiny_vit, "sfn", {"scale": 0.5}),
    (_tiny_vit, "ecmt", {"timesteps": 2}),
    (_tiny_vit, "mbe", {"timesteps": 16}),
], ids=lambda v: v if isinstance(v, str) else None)
def test_every_method_writes_declared_keys_and_round_trips(make, method, kw, tmp_path):
    snn = convert(make(), _data((1, 8, 8)), method=method, **kw)
    _all_declared(snn.graph)
    validate_graph(snn.graph)
    _round_trip(snn, tmp_path)
    keys = {k for n in snn.graph.nodes for k in n.attrs}
    if method in ("if", "ecmt"):
        assert "temporal" in keys
    if method == "mbe":
        assert {"mbe_fn", "mbe_product", "amax", "delta_amax"} <= keys


# ---------------------------------------------------------------- the generic checks

@pytest.fixture(scope="module")
def converted():
    return convert(_tiny_cnn(), _data((1, 8, 8)), scale=0.5)


def _refused(graph, *words):
    with pytest.raises(GraphError) as info:
        validate_graph(graph)
    msg = str(info.value)
    assert "\n" not in msg and all(w in msg for w in words), msg
    return msg


def _node(graph, op):
    return next(n for n in graph.nodes if n.op == op)


@pytest.mark.parametrize("edit,words", [
    (lambda g: _node(g, "conv2d").attrs.update(note="hello"), ("conv2d", "unknown attr(s) 'note'")),
    (lambda g: _node(g, "sfn").attrs.update(lamda=0.3), ("unknown attr(s) 'lamda'",)),
    (lambda g: _node(g, "conv2d").params.update(scale=torch.ones(1)), ("unknown param(s) 'scale'",)),
    (lambda g: _node(g, "conv2d").attrs.update(stride=2), ("'stride'", "a list of 2 integers", "got 2")),
    (lambda g: _node(g, "conv2d").attrs.update(groups=True), ("'groups'", "an integer", "True")),
    (lambda g: _node(g, "sfn").attrs.update(kind="triple"), ("'kind'", "'dual' or 'softmax'", "'triple'")),
    (lambda g: _node(g, "sfn").attrs.update(theta_pos=float("nan")), ("'theta_pos'", "finite number")),
    (lambda g: _node(g, "sfn").attrs.update(absorbs="gelu"), ("'absorbs'", "'relu' or None")),
    (lambda g: _node(g, "sfn").attrs.update(temporal="later"), ("'temporal'", "'static'")),
    (lambda g: _node(g, "sfn").attrs.pop("role"), ("missing attr(s) 'role'",)),
    (lambda g: _node(g, "max_pool2d").attrs.update(ceil_mode=0), ("'ceil_mode'", "True or False")),
    (lambda g: _node(g, "flatten").attrs.update(start="1"), ("'start'", "an integer")),
    (lambda g: _node(g, "sfn").params.update(table=torch.zeros(9)), ("'table'", "integer tensor")),
    (lambda g: _node(g, "sfn").params.update(steps=torch.zeros(3)), ("'steps'", "2 values")),
    (lambda g: _node(g, "linear").params.update(weight=torch.zeros(4, 16, 1)), ("'weight'", "2 dimension(s)")),
    (lambda g: _node(g, "linear").attrs.update(x="y" * 500), ("unknown attr(s)",)),
], ids=["unknown_attr", "typo", "unknown_param", "pair", "bool_int", "literal", "nan", "nullable", "annotation",
        "missing", "bool", "str_int", "int_param", "size", "rank", "long_key"])
def test_generic_checks_refuse_what_the_declaration_excludes(converted, edit, words):
    g = copy.deepcopy(converted.graph)
    validate_graph(g)
    edit(g)
    msg = _refused(g, *words)
    assert len(msg) < 300


def test_optional_keys_may_be_absent_and_annotations_go_anywhere(converted):
    g = copy.deepcopy(converted.graph)
    for n in g.nodes:
        n.attrs["temporal"] = "step"
        for key in ("percentile", "calib_samples", "hist_hi"):
            n.attrs.pop(key, None)
    validate_graph(g)


def test_a_node_built_by_hand_is_held_to_its_op():
    n = Node("p", "pad", ["x"], {"pad": [1, 1], "value": float("-inf")})
    check_declared("p", n)
    n.attrs["value"] = float("inf")
    with pytest.raises(GraphError, match="'value' must be a finite number or -inf"):
        check_declared("p", n)


# ---------------------------------------------------------------- docs/ops.md is the table

def test_docs_list_every_op_with_its_declaration():
    spec = importlib.util.spec_from_file_location("op_table", os.path.join(ROOT, "examples", "op_table.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    with open(os.path.join(ROOT, "docs", "ops.md"), encoding="utf-8") as f:
        assert f.read() == mod.markdown(), "docs/ops.md is stale: run python examples/op_table.py"


@pytest.mark.parametrize("op, attrs, shape", [
    ("gelu", {}, (3, 7, 33)), ("gelu", {"approximate": "tanh"}, (5, 17)),
    ("softmax", {"dim": -1}, (2, 3, 197, 197)), ("softmax", {"dim": 2}, (4, 6, 35)),
    ("softmax", {"dim": 1}, (4, 6, 35)),                      # not the last axis: the implementation runs
    ("mul", {"other": 0.125}, (2, 6, 50, 50)), ("mul", {"other": 0.3}, (1001,)), ("mul", {"other": float("inf")}, (9,)),
    ("div", {"other": 3.0}, (7, 129)), ("div", {"other": 0.1}, (64,))])
def test_in_place_forms_give_the_implementations_bits(op, attrs, shape):
    """An op's in-place form (ops.IN_PLACE, run by the interpreter over an input nothing else reads) writes the
    very bits its implementation returns, into the input's own storage; None where it does not apply."""
    from sfn_deploy.ops import IN_PLACE, apply, apply_form
    torch.manual_seed(0)
    x = torch.randn(shape) * 30
    x.view(-1)[:3] = torch.tensor([0.0, -0.0, 1e30])
    node = Node("n", op, ["x"], attrs, {}, list(shape), 0)
    ref = apply(node, [x.clone()], None, shape[0])
    y = x.clone()
    out = apply_form(IN_PLACE, node, [y], 0)
    if op == "softmax" and attrs["dim"] not in (-1, len(shape) - 1):
        assert out is None
        return
    assert out is not None and out.data_ptr() == y.data_ptr()
    assert torch.equal(out.view(torch.int32), ref.view(torch.int32))
    if op in ("mul", "div"):               # by a second input: the implementation runs
        assert apply_form(IN_PLACE, Node("n", op, ["a", "b"], {}, {}, list(shape), 0), [x, x], 0) is None


def test_in_place_sum_writes_over_either_operand():
    """``add`` over its operand i gives the bits of a + b; a scalar, a multiplier or broadcasting does not run so."""
    from sfn_deploy.ops import IN_PLACE, apply, apply_form
    torch.manual_seed(0)
    a, b = torch.randn(4, 197, 33) * 1e3, torch.randn(4, 197, 33)
    node = Node("n", "add", ["a", "b"], {}, {}, [4, 197, 33], 0)
    ref = apply(node, [a, b], None, 4)
    for i in (0, 1):
        args = [a.clone(), b.clone()]
        out = apply_form(IN_PLACE, node, args, i)
        assert out is not None and out.data_ptr() == args[i].data_ptr()
        assert torch.equal(out.view(torch.int32), ref.view(torch.int32))
    assert apply_form(IN_PLACE, node, [a.clone(), b[:1].clone()], 0) is None
    assert apply_form(IN_PLACE, Node("n", "add", ["a", "b"], {"alpha": 2}, {}, [4, 197, 33], 0), [a, b], 0) is None
    assert apply_form(IN_PLACE, Node("n", "add", ["a"], {"other": 1.0}, {}, [4, 197, 33], 0), [a], 0) is None
