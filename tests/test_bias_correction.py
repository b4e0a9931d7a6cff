"""Bias correction: the SNN's biases absorb each weight layer's mean SNN − ANN shift; the ANN reference, the ONNX ANN
export and the model file keep the source model's."""
import copy
import json

import pytest
import torch
import torch.nn as nn
from click.testing import CliRunner

from sfn_deploy import bias_correction
from sfn_deploy.cli import main
from sfn_deploy.convert import convert
from sfn_deploy.data import Dataset, load_data
from sfn_deploy.errors import UserError
from sfn_deploy.model_file import load, save
from sfn_deploy.simulators.interpreter import run


@pytest.fixture(scope="module")
def cnn_data():
    """A small CNN whose SNN at a coarse λ is biased (clipping at θ, few levels) on data with a constant
    background, the case the correction is for."""
    torch.manual_seed(0)
    x = torch.zeros(600, 1, 12, 12)
    x[:, :, 3:9, 3:9] = torch.rand(600, 1, 6, 6)
    m = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2), nn.Conv2d(8, 8, 3), nn.ReLU(),
                      nn.Flatten(), nn.Linear(8 * 4 * 4, 4)).eval()
    with torch.no_grad():
        y = m(x).argmax(-1)
    return m, Dataset(x, y, name="toy")


def _bias(graph, x):
    """Mean over classes of |mean SNN − ANN logit|: the shift the correction is for."""
    return float((run(graph, x) - run(graph, x, spiking=False)).mean(0).abs().mean())


def test_corrected_snn_is_closer_and_the_ann_is_the_source(cnn_data):
    m, data = cnn_data
    off = convert(m, data, scale=0.4, bias_correction="off", input_encoding="analog").graph
    on = convert(m, data, scale=0.4, bias_correction="on", input_encoding="analog").graph
    x = data.x[300:]
    with torch.no_grad():
        assert torch.allclose(run(on, x, spiking=False), m(x), atol=1e-5)       # the ANN is still the source model
    assert torch.equal(run(on, x, spiking=False), run(off, x, spiking=False))
    assert _bias(on, x) < 0.5 * _bias(off, x)
    convs = [n for n in on.nodes if n.op in ("conv2d", "linear")]
    assert "bias_ann" not in convs[0].params                   # before the first site both nets read the same input
    for n in convs[1:]:
        assert torch.equal(n.params["bias_ann"], off[n.name].params["bias"])
        assert not torch.equal(n.params["bias"], n.params["bias_ann"])


def test_step_through_visits_each_weight_layer_in_order_and_carries_a_replaced_output(cnn_data):
    """A hook that keeps the SNN's outputs ends where the SNN does; one that hands on the ANN's output of the last
    layer makes the result the ANN's; rerun() recomputes the layer from the SNN's inputs with its parameters."""
    m, data = cnn_data
    g = convert(m, data, scale=0.4, bias_correction="off", input_encoding="analog").graph
    x = data.x[:64]
    seen, last = [], {}

    def keep(layer):
        seen.append(layer.node.name)
        assert torch.equal(layer.rerun(), layer.snn)
        last.update(snn=layer.snn, ann=layer.ann)
    bias_correction.step_through(g, x, keep)
    assert seen == [n.name for n in g.nodes if n.op in ("conv2d", "linear")]
    assert torch.equal(last["snn"], run(g, x)) and torch.equal(last["ann"], run(g, x, spiking=False))

    def ann_from_the_second(layer):       # the second layer hands on the ANN's output: the third reads its levels
        if layer.node.name == seen[1]:
            return layer.ann
        if layer.node.name == seen[2]:
            last.update(snn_in=layer.snn_inputs[0], ann_in=layer.ann_inputs[0])
        return None
    bias_correction.step_through(g, x, ann_from_the_second)
    plain = {}
    bias_correction.step_through(g, x, lambda layer: plain.update({layer.node.name: layer.snn_inputs[0]}))
    assert not torch.equal(last["snn_in"], plain[seen[2]])
    assert (last["snn_in"] - last["ann_in"]).abs().mean() < (plain[seen[2]] - last["ann_in"]).abs().mean()


def test_shifts_leave_no_mean_shift_on_the_batch_they_were_measured_on(cnn_data):
    m, data = cnn_data
    g = convert(m, data, scale=0.4, bias_correction="off").graph
    x = data.x[:256]
    bias_correction.apply(g, bias_correction.shifts(g, x))
    again = bias_correction.shifts(g, x)                      # what is left: rounding, and the levels it moved
    first = bias_correction.shifts(convert(m, data, scale=0.4, bias_correction="off").graph, x)
    assert max(float(s.abs().max()) for s in again.values()) < 0.5 * max(float(s.abs().max()) for s in first.values())


def test_auto_keeps_it_only_if_validation_agreement_does_not_fall(cnn_data, monkeypatch):
    m, data = cnn_data
    kept = convert(m, data, scale=0.4).metrics["bias_correction"]
    assert kept["mode"] == "auto" and kept["applied"] and kept["val_agreement_after"] >= kept["val_agreement_before"]
    monkeypatch.setattr(bias_correction, "shifts", lambda graph, x: {                      # a harmful "correction"
        n.name: 5.0 * torch.arange(n.params["weight"].shape[0], dtype=torch.float32)
        for n in graph.nodes if n.op == "linear"})
    snn = convert(m, data, scale=0.4)
    record = snn.metrics["bias_correction"]
    assert not record["applied"] and record["val_agreement_after"] < record["val_agreement_before"]
    assert not any("bias_ann" in n.params for n in snn.graph.nodes)
    assert torch.equal(snn.graph[[n.name for n in snn.graph.nodes if n.op == "linear"][0]].params["bias"],
                       m[-1].bias.detach())


def test_auto_keeps_the_drop_within_the_budget_or_the_goal(cnn_data, monkeypatch):
    """Higher agreement is not enough when the drop grows past the budget, or without one past config.GOAL
    (convert passes cfg.goal)."""
    from sfn_deploy.config import GOAL
    assert bias_correction.keep(80.0, 82.0, [0.3, 0.4], 0.5)
    assert not bias_correction.keep(80.0, 82.0, [0.3, 1.2], 0.5)        # agreement up, drop past the goal
    assert bias_correction.keep(80.0, 82.0, [1.5, 1.2], 0.5)            # already past it: not worse
    assert not bias_correction.keep(82.0, 80.0, [0.3, 0.2], 0.5)        # agreement down
    assert bias_correction.keep(80.0, 82.0, [0.3, 1.2], None)
    m, data = cnn_data
    seen = []
    correct = bias_correction.correct
    monkeypatch.setattr(bias_correction, "correct", lambda *a, **k: seen.append(a[5]) or correct(*a, **k))
    convert(m, data, scale=0.4)
    convert(m, data, max_drop=1.0, trials=2, levels_if_missed=0, fine_if_missed=False)
    assert seen == [GOAL, 1.0]


def test_model_file_and_onnx_ann_export_keep_the_source_bias(cnn_data, tmp_path):
    pytest.importorskip("onnxruntime")
    from sfn_deploy.exporters.onnx import OnnxRunner, to_onnx
    m, data = cnn_data
    snn = convert(m, data, scale=0.4, bias_correction="on")
    save(snn, str(tmp_path / "m.sfn.pt"))
    back = load(str(tmp_path / "m.sfn.pt"))
    x = data.x[:64]
    assert torch.equal(run(back.graph, x), run(snn.graph, x))
    assert torch.equal(run(back.graph, x, spiking=False), run(snn.graph, x, spiking=False))
    ann = OnnxRunner(to_onnx(back, ann=True))(x)
    assert torch.allclose(torch.as_tensor(ann), run(back.graph, x, spiking=False), atol=1e-5)
    spiking = OnnxRunner(to_onnx(back))(x)
    assert torch.allclose(torch.as_tensor(spiking), run(back.graph, x), atol=1e-4)
    bad = copy.deepcopy(snn)                                    # a file whose bias_ann has the wrong length
    layer = next(n for n in bad.graph.nodes if "bias_ann" in n.params)
    layer.params["bias_ann"] = layer.params["bias_ann"][:-1].clone()
    save(bad, str(tmp_path / "bad.sfn.pt"))
    with pytest.raises(UserError, match="bias_ann"):
        load(str(tmp_path / "bad.sfn.pt"))


def test_cli_option_and_refusal(digits_pt2, tmp_path):
    runner = CliRunner()
    base = ["convert", digits_pt2, "--data", "sklearn:digits", "--scale", "0.3", "--json"]
    r = runner.invoke(main, base + ["-o", str(tmp_path / "off.sfn.pt"), "--bias-correction", "off"])
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["bias_correction"] is None
    assert not any("bias_ann" in n.params for n in load(str(tmp_path / "off.sfn.pt")).graph.nodes)
    r = runner.invoke(main, base + ["-o", str(tmp_path / "on.sfn.pt"), "--bias-correction", "on"])
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["bias_correction"]["applied"]
    r = runner.invoke(main, ["convert", digits_pt2, "--data", "sklearn:digits", "-o", str(tmp_path / "if.sfn.pt"),
                             "--bias-correction", "on", "--method", "if"])
    assert r.exit_code == 2 and "option 'bias_correction': applies to the SFN method only, not if" in r.stderr


def test_tune_output_is_corrected_like_convert(digits_pt2, tmp_path):
    """``tune -o`` writes the chosen point with the same last pass as convert, and honours --bias-correction."""
    runner = CliRunner()
    base = ["tune", digits_pt2, "--data", "sklearn:digits", "--trials", "3", "--val-fraction", "0.3", "--json"]
    for mode in ("on", "off"):
        out = tmp_path / f"{mode}.sfn.pt"
        r = runner.invoke(main, base + ["--storage", str(tmp_path / f"{mode}.db"), "-o", str(out),
                                        "--bias-correction", mode])
        assert r.exit_code == 0, r.stderr
        m = load(str(out))
        assert any("bias_ann" in n.params for n in m.graph.nodes) == (mode == "on")
        assert ("bias_correction" in m.metrics) == (mode == "on")


def test_tune_output_is_searched_again_at_more_levels_like_convert(digits_pt2, tmp_path):
    """``tune -o`` ends with convert's passes after the search: at M = 1 the digits MLP misses the goal, so the
    file holds the second search's M = 8 and the same λ and biases that convert writes from the same study
    options; the text says why."""
    runner = CliRunner()
    opts = ["--data", "sklearn:digits", "--trials", "4", "--val-fraction", "0.3", "--levels", "1",
            "--levels-if-missed", "8"]
    r = runner.invoke(main, ["tune", digits_pt2, *opts, "--storage", str(tmp_path / "t.db"),
                             "-o", str(tmp_path / "t.sfn.pt")])
    assert r.exit_code == 0, r.stderr
    assert "searched again at M = 8" in r.stdout
    r = runner.invoke(main, ["convert", digits_pt2, *opts, "--storage", str(tmp_path / "c.db"),
                             "-o", str(tmp_path / "c.sfn.pt"), "--json"])
    assert r.exit_code == 0, r.stderr
    t, c = load(str(tmp_path / "t.sfn.pt")), load(str(tmp_path / "c.sfn.pt"))
    assert t.config["levels"] == c.config["levels"] == 8 and t.search["missed"]["levels"] == 1
    assert t.search["chosen"]["lam"] == c.search["chosen"]["lam"]
    assert t.metrics["input_abs_max"] == c.metrics["input_abs_max"]
    x = load_data("sklearn:digits").x[:300]
    assert torch.equal(run(t.graph, x), run(c.graph, x))


@pytest.mark.parametrize("kept", [True, False])
def test_convert_reports_from_the_checks_passes_what_evaluate_measures(cnn_data, monkeypatch, kept):
    """convert(validate=True) takes its validation figures from the auto check's passes (the state it kept)
    instead of running the SNN and the ANN again: they equal a separate evaluate, op counts included."""
    from sfn_deploy.evaluation import evaluate
    m, data = cnn_data
    if not kept:                # a shift that makes the SNN answer the ANN's rarest class: the check reverts it
        rare = int(data.y.bincount(minlength=4).argmin())

        def shifts(g, x):
            last = [n.name for n in g.nodes if n.op == "linear"][-1]
            return {last: -1000.0 * torch.nn.functional.one_hot(torch.tensor(rare), 4).float()}
        monkeypatch.setattr(bias_correction, "shifts", shifts)
    c = convert(m, data, scale=0.4, validate=True)
    assert c.metrics["bias_correction"]["applied"] is kept
    again = evaluate(c, data.validation_split(2000)[0])
    assert c.validation.to_dict() == again.to_dict()
    assert c.metrics["agreement"] == again.agreement and c.metrics["energy_ratio"] == again.energy_ratio


@pytest.mark.parametrize("search", ["shared", "per-block"])
def test_search_mode_scores_each_trial_as_convert_delivers_it(cnn_data, search):
    """``--bias-correction search``: every trial is scored with its own correction, so the chosen point's
    validation accuracy is exactly what the delivered (corrected) network scores on the same images; the search
    leaves no trial's correction behind, and its study is not the uncorrected one's."""
    from sfn_deploy.config import load_config
    from sfn_deploy.convert import build_graph
    from sfn_deploy.tuning import run_search, study_name
    m, data = cnn_data
    opts = {"trials": 6, "max_drop": 1.0, "search": search, "val_size": 300}
    c = convert(m, data, bias_correction="search", validate=True, **opts)
    assert c.metrics["bias_correction"]["mode"] == "search" and c.metrics["bias_correction"]["applied"]
    assert c.search["chosen"]["accuracy"] == pytest.approx(c.metrics["accuracy"], abs=1e-9)
    names = {mode: study_name({}, load_config("", {**opts, "bias_correction": mode}))
             for mode in ("search", "auto", "off")}
    assert names["search"] == names["auto"] != names["off"]     # with a budget, auto is search
    g = build_graph(m, data, load_config("", {**opts, "bias_correction": "search"}))
    run_search(g, data, load_config("", {**opts, "bias_correction": "search"}), {})
    assert not any("bias_ann" in n.params for n in g.nodes)


def test_auto_is_search_with_a_budget_and_the_after_the_fact_check_without(cnn_data):
    """The default: with --max-drop the search scores every trial corrected (the budget kept as often, the energy
    lower on most held-out models); without a budget, or at a fixed λ, the chosen point is corrected afterwards and
    kept only if the check allows."""
    from sfn_deploy.config import load_config
    m, data = cnn_data
    assert load_config("", {"max_drop": 1.0}).correction == "search"
    assert [load_config("", kw).correction for kw in ({}, {"scale": 0.3}, {"max_drop": 1.0, "bias_correction": "on"},
                                                        {"max_drop": 1.0, "bias_correction": "off"})] == [
        "auto", "auto", "on", "off"]
    budget = convert(m, data, trials=4, max_drop=1.0, val_size=300)
    assert budget.metrics["bias_correction"]["mode"] == "search"
    assert budget.config["bias_correction"] == "auto"          # what the user asked for is what is recorded
    plain = convert(m, data, trials=4, val_size=300)
    assert plain.metrics["bias_correction"]["mode"] == "auto" and "val_agreement_before" in plain.metrics[
        "bias_correction"]


def test_the_search_mode_measures_each_trial_from_the_source_biases(cnn_data):
    """Each trial reverts the last one's correction before measuring its own: scoring λ after other λ gives the
    figures of scoring it first."""
    from sfn_deploy.evaluation import ann_reference, energy_constants
    from sfn_deploy.staged import Evaluator
    m, data = cnn_data
    g = convert(m, data, scale=0.4, bias_correction="off").graph
    val = Dataset(data.x[:300], data.y[:300], name="val")
    ref = ann_reference(g, val, "accuracy")
    x = data.x[300:556]
    ev = Evaluator(g, val.x, ref, 256, energy_constants(), correct=x)
    first = ev.full({s.name: 0.5 for s in g.sites})
    for lam in (0.2, 0.8, 0.35):
        ev.full({s.name: lam for s in g.sites})
    again = ev.full({s.name: 0.5 for s in g.sites})
    assert (first.accuracy, first.energy) == (again.accuracy, again.energy)
    plain = Evaluator(g, val.x, ref, 256, energy_constants()).full({s.name: 0.5 for s in g.sites})
    assert plain.accuracy != first.accuracy
