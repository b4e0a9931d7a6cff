"""Output fidelity (sfn_deploy.fidelity): backbones without a head, feature maps and unlabeled data convert,
search, evaluate, report and export, scored against the ANN's own outputs."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from sfn_deploy import fidelity
from sfn_deploy.cli import main
from sfn_deploy.errors import UserError
from sfn_deploy.evaluation import drop_of


def run(*args):
    r = CliRunner().invoke(main, [str(a) for a in args])
    return r.exit_code, r.stdout, r.stderr


def test_cosine_and_relative_error_per_sample():
    a = torch.tensor([[1.0, 0.0], [1.0, 2.0], [0.0, 0.0], [0.0, 0.0]])
    b = torch.tensor([[0.0, 3.0], [2.0, 4.0], [0.0, 0.0], [1.0, 0.0]])
    assert fidelity.cosine(a, b).tolist() == pytest.approx([0.0, 1.0, 1.0, 0.0])
    assert fidelity.relative_error(a, b).tolist()[:2] == pytest.approx([math.sqrt(10) / 3, 0.5])
    maps = torch.randn(3, 2, 4, 4)      # feature maps are flattened per sample
    assert fidelity.cosine(maps, 2 * maps).tolist() == pytest.approx([1.0] * 3)


def test_the_interval_from_moments_is_the_interval_of_the_values():
    d = torch.randn(500, generator=torch.Generator().manual_seed(0)) + 0.3
    mean, low, high = fidelity.normal_interval(d)
    assert low < mean < high and mean == pytest.approx(float(d.mean()))
    assert fidelity.interval_from_moments(float(d.sum()), float((d * d).sum()), 500) == pytest.approx((low, high))
    drop = drop_of(torch.ones(4), torch.tensor([1.0, 0.98, 0.99, 0.97]), binary=False)
    assert drop.points == pytest.approx(1.5) and drop.ann_only is None and "normal" in drop.method
    assert "ann_only" not in drop.to_dict()


def test_resolve_picks_output_for_backbones_and_maps():
    class Headless(torch.nn.Module):
        num_classes = 0
    assert fidelity.resolve("auto", [1, 10]) == "accuracy"
    assert fidelity.resolve("auto", [1, 512], Headless()) == "output"
    assert fidelity.resolve("auto", [1, 8, 4, 4]) == "output"
    assert fidelity.resolve("output", [1, 10]) == "output"
    with pytest.raises(UserError, match="N×classes"):
        fidelity.resolve("accuracy", [1, 8, 4, 4])
    assert fidelity.of({}) == "accuracy" and fidelity.of({"fidelity": "output"}) == "output"


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """48 unlabeled 3×32×32 samples and the same with labels (an .npz without y is unlabeled)."""
    root = tmp_path_factory.mktemp("fid")
    x = np.random.RandomState(0).rand(48, 3, 32, 32).astype(np.float32)
    np.savez(root / "u.npz", x=x)
    np.savez(root / "l.npz", x=x, y=np.arange(48) % 3)
    return root


def test_a_backbone_without_its_head_converts_searches_and_reports(images, tmp_path):
    out = tmp_path / "b.sfn.pt"
    code, text, err = run("convert", "timm:test_resnet", "--model-args", "num_classes=0", "--data",
                          images / "u.npz", "--search", "per-block", "--trials", "6", "--max-drop", "10",
                          "-o", out, "--json")
    assert code == 0, err
    assert "measure the drop to" not in err                   # the interval is well within half of the budget
    r = json.loads(text)
    assert r["config"]["fidelity"] == "output" and r["agreement"] is None and r["accuracy"] is None
    assert 0 < r["cosine"] <= 1 and r["relative_error"] >= 0
    # the search chose within the budget on the validation images, in points of 100·cosine
    assert r["drop"]["points"] == pytest.approx(100 * (1 - r["cosine"]), abs=1e-3)
    assert r["drop"]["points"] <= 10 and "normal" in r["drop"]["method"]
    ev = json.loads(run("evaluate", out, "--data", images / "u.npz", "--json")[1])
    assert ev["fidelity"] == "output" and ev["cosine"] == pytest.approx(r["cosine"], abs=1e-6)
    rep = json.loads(run("report", out, "--data", images / "u.npz", "--limit", "8", "--target", "cmos45",
                         "--json")[1])
    assert rep["fidelity"] == "output" and 0 < rep["cosine"] <= 1 and rep["agreement"] is None
    code, text, err = run("evaluate", out, "--data", images / "u.npz", "--limit", "8")
    assert code == 0 and "cosine similarity" in text and "points of 100·cosine" in text, err
    code, _, err = run("convert", "timm:test_resnet", "--model-args", "num_classes=0", "--data", images / "u.npz",
                       "--trials", "2", "--max-drop", "0.001", "-o", tmp_path / "t.sfn.pt")
    assert code == 0 and "more than half of --max-drop 0.001" in err, err


def _convert_unlabeled(images, out, model_args: str) -> None:
    """timm's test ResNet with ``model_args``, converted at λ 0.2 on the unlabeled images: output fidelity."""
    code, text, err = run("convert", "timm:test_resnet", "--model-args", model_args, "--data", images / "u.npz",
                          "--scale", "0.2", "-o", out, "--json")
    assert code == 0, err
    assert json.loads(text)["config"]["fidelity"] == "output"


def test_feature_maps_convert_and_run_on_onnx(images, tmp_path):
    out = tmp_path / "m.sfn.pt"
    _convert_unlabeled(images, out, "num_classes=0,global_pool=''")
    code, text, err = run("simulate", out, "--data", images / "u.npz", "--limit", "4", "--backend", "onnx",
                          "--json")
    assert code == 0, err
    onnx = json.loads(text)["backends"]["onnx"]
    assert onnx["max_abs_diff"] < 1e-3 and onnx["cosine"] > 0.9999 and onnx["prediction_agreement"] is None
    code, text, err = run("simulate", out, "--data", images / "u.npz", "--limit", "4", "--backend", "onnx",
                          "--per-layer", "--json")
    assert code == 0, err
    row = json.loads(text)["parity"][0]
    assert row["cosine"] > 0.9999 and row["prediction_agreement"] is None


def test_unlabeled_classifier_data_is_scored_against_the_anns_top1(images, tmp_path):
    code, text, err = run("convert", "timm:test_resnet", "--model-args", "num_classes=3", "--data",
                          images / "u.npz", "--trials", "3", "--bias-correction", "off", "-o",
                          tmp_path / "c.sfn.pt", "--json")
    assert code == 0, err
    r = json.loads(text)
    assert r["config"]["fidelity"] == "accuracy" and r["accuracy"] is None and r["drop"] is None
    assert r["chosen"]["accuracy"] == pytest.approx(r["agreement"])     # the search maximised agreement


def test_a_classifier_at_chance_on_its_labels_is_warned_about(images, tmp_path):
    code, _, err = run("convert", "timm:test_resnet", "--model-args", "num_classes=0", "--fidelity", "accuracy",
                       "--data", images / "l.npz", "--scale", "0.2", "-o", tmp_path / "w.sfn.pt")
    assert code == 0, err
    assert "--fidelity output" in err and "chance" in err


def test_several_outputs_are_joined_and_their_shapes_recorded(images, tmp_path):
    out = tmp_path / "f.sfn.pt"
    _convert_unlabeled(images, out, "features_only=True,out_indices=(1,2)")
    parts = json.loads(run("inspect", out, "--json")[1])["output_parts"]
    assert len(parts) == 2 and all(len(p) == 3 for p in parts)
    code, _, err = run("export", out, "--target", "onnx", "-o", tmp_path / "f.onnx")
    assert code == 0, err
    import onnx
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "f.onnx")).metadata_props}
    assert json.loads(meta["sfn_deploy.output_parts"]) == parts
    ev = json.loads(run("evaluate", out, "--data", images / "u.npz", "--limit", "4", "--json")[1])
    assert 0 < ev["cosine"] <= 1 and len(ev["cosine_parts"]) == 2 and all(0 < v <= 1 for v in ev["cosine_parts"])
    rep = json.loads(run("report", out, "--data", images / "u.npz", "--limit", "4", "--target", "cmos45",
                         "--json")[1])
    assert rep["cosine_parts"] == pytest.approx(ev["cosine_parts"])
    line = run("convert", "timm:test_resnet", "--model-args", "features_only=True", "--fidelity", "accuracy",
               "--data", images / "l.npz", "--scale", "0.2", "-o", tmp_path / "g.sfn.pt")[2]
    assert "several tensors" in line and "--fidelity output" in line


def test_model_args_keep_commas_inside_brackets():
    from sfn_deploy.models import parse_model_args
    assert parse_model_args("features_only=True,out_indices=(1,2),x=[3, 4]") == {
        "features_only": True, "out_indices": (1, 2), "x": [3, 4]}


def test_a_damaged_output_parts_record_is_refused():
    from sfn_deploy.ir import GraphError, check_graph_dict
    d = {"nodes": [{"name": "input", "op": "input", "shape": [1, 4]}], "output": "input"}
    for bad in ([], [[0]], [["a"]], "4"):
        with pytest.raises(GraphError, match="output_parts"):
            check_graph_dict({**d, "output_parts": bad})


def test_auto_on_unlabeled_data_tells_a_pt2_backbone_from_a_classifier(images, tmp_path):
    """A .pt2 returning N×D says nothing of its task; without labels, the output's producer decides: a weight
    layer (a head) is a classifier, anything else (here a pooled activation) a backbone."""
    body = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3),
                               torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    dim = {0: torch.export.Dim("batch", min=1, max=4096)}
    for name, net, want in (("backbone", body, "output"),
                            ("classifier", torch.nn.Sequential(body, torch.nn.Linear(8, 3)), "accuracy")):
        path = tmp_path / f"{name}.pt2"
        torch.export.save(torch.export.export(net.eval(), (torch.zeros(2, 3, 32, 32),), dynamic_shapes=(dim,)),
                          path)
        code, text, err = run("convert", path, "--data", images / "u.npz", "--scale", "0.2", "-o",
                              tmp_path / f"{name}.sfn.pt", "--json")
        assert code == 0, err
        assert json.loads(text)["config"]["fidelity"] == want, name
        # with labels, auto keeps the classifier reading (the chance warning covers a backbone)
        code, text, err = run("convert", path, "--data", images / "l.npz", "--scale", "0.2", "-o",
                              tmp_path / f"{name}.l.sfn.pt", "--json")
        assert code == 0 and json.loads(text)["config"]["fidelity"] == "accuracy", err
