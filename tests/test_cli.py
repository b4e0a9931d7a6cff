"""The CLI as a user runs it: JSON contracts, exit codes, one-line errors, no partial outputs."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from sfn_deploy.cli import main
from sfn_deploy.model_file import load

CLI = [sys.executable, "-m", "sfn_deploy.cli"]


class Result:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def sfn(*args):
    """Run the CLI in-process (fast); the fixture below also runs it as a real subprocess."""
    r = CliRunner().invoke(main, [str(a) for a in args])
    return Result(r.exit_code, r.stdout, r.stderr)


def sfn_process(*args):
    r = subprocess.run(CLI + [str(a) for a in args], capture_output=True, text=True, timeout=600)
    return Result(r.returncode, r.stdout, r.stderr)


def test_convert_says_when_the_default_misses_its_goal(tmp_path, digits_pt2):
    """Without --max-drop the search keeps to a 0.5-point goal; a result still further below the ANN on the
    validation images (here two levels per polarity, which no λ rescues) is named in one warning line."""
    r = sfn("convert", digits_pt2, "--data", "sklearn:digits", "--levels", 2, "--trials", 4, "-o", tmp_path / "m.pt",
            "--json")
    assert r.returncode == 0, r.stderr
    drop = json.loads(r.stdout)["drop"]["points"]
    assert drop > 0.5
    line = next(x for x in r.stderr.splitlines() if "default's goal of 0.5 points" in x)
    assert f"drop {drop:.2f} points" in line and "no λ at M = 2 reached it" in line
    r = sfn("convert", digits_pt2, "--data", "sklearn:digits", "--levels", 2, "--trials", 4, "--max-drop", 5,
            "-o", tmp_path / "b.pt")
    assert r.returncode == 0 and "default's goal" not in r.stderr      # a budget the user gave: no goal


def test_convert_names_every_search_of_the_ladder(tmp_path, digits_pt2, monkeypatch):
    """M = 1 and M = 2 miss the goal (their checked results made wrong everywhere), so the last step, 32 linear
    levels, runs and is kept: the output names each search, the JSON gives M, fire function and every try, and
    the file holds M = 16 linear."""
    from dataclasses import replace

    from sfn_deploy import bias_correction
    real = bias_correction.correct

    def fake(graph, *a, **k):
        record, checked = real(graph, *a, **k)
        short = graph.sites[0].attrs["M"] < 16
        return record, replace(checked, snn=(checked.ann + 1) % 10 if short else checked.ann.clone())
    monkeypatch.setattr(bias_correction, "correct", fake)
    out = tmp_path / "m.pt"
    args = ["convert", digits_pt2, "--data", "sklearn:digits", "--levels", 1, "--levels-if-missed", 2,
            "--fine-if-missed", "--trials", 4, "-o", out]
    r = sfn(*args)
    assert r.returncode == 0, r.stderr
    assert "λ search at M = 1: not within 0.5 points" in r.stdout
    assert "searched again at M = 2: not within 0.5 points" in r.stdout
    assert "searched again at M = 16 linear:" in r.stdout
    payload = json.loads(sfn(*args, "--json").stdout)
    assert payload["levels"] == 16 and payload["fire"] == "linear" and payload["missed"]["levels"] == 1
    assert [(t["levels"], t["fire"], t["kept"]) for t in payload["tries"]] == \
        [(1, "sformer", False), (2, "sformer", False), (16, "linear", True)]
    assert (load(out).config["levels"], load(out).config["fire"]) == (16, "linear")


def test_convert_reports_the_check_and_warns_of_a_miss_there(tmp_path, digits_pt2, monkeypatch):
    """The check's drop (images the search did not choose on) is a line of the output and the JSON's ``check``;
    without a budget, a check still past the goal after every M is named in the goal warning."""
    import importlib

    from sfn_deploy.evaluation import PairedDrop
    args = ["convert", digits_pt2, "--data", "sklearn:digits", "--levels", 8, "--trials", 4, "--val-size", 600,
            "--check-size", 1000, "-o", tmp_path / "m.pt"]
    r = sfn(*args)
    assert r.returncode == 0, r.stderr
    assert "check (1,000 of 1,797 images of --data the search did not choose on): drop " in r.stdout
    payload = json.loads(sfn(*args, "--json").stdout)
    assert payload["check"]["samples"] == 1000 and payload["check"]["drop"]["n"] == 1000
    conversion = importlib.import_module("sfn_deploy.convert")
    monkeypatch.setattr(conversion._Check, "drop", lambda self, graph, batch_size: PairedDrop(
        points=2.5, low=1.5, high=3.5, confidence=0.95, n=len(self.data), ann_only=30, snn_only=5))
    r = sfn(*args)
    line = next(x for x in r.stderr.splitlines() if "default's goal of 0.5 points" in x)
    assert "drop 2.50 points (95 % CI 1.50 to 3.50, paired, n = 1,000) on the images the search did not " \
           "choose on" in line and "no λ at M = 8 reached it" in line
    r = sfn(*args, "--max-drop", 2)                    # a budget: reported, with the budget it passes
    assert "default's goal" not in r.stderr
    line = next(x for x in r.stderr.splitlines() if "did not choose on" in x)
    assert "drop 2.50 points" in line and "more than --max-drop 2:" in line
    assert "did not choose on" not in sfn(*args, "--max-drop", 3).stderr


@pytest.fixture(scope="module")
def converted(tmp_path_factory, digits_pt2):
    out = tmp_path_factory.mktemp("conv") / "model.pt"
    r = sfn_process("convert", digits_pt2, "--data", "sklearn:digits", "-o", out, "--trials", 8,
                    "--val-fraction", 0.3, "--json")
    assert r.returncode == 0, r.stderr
    return out, json.loads(r.stdout)


def test_convert_json(converted):
    out, payload = converted
    for key in ("accuracy", "ann_accuracy", "agreement", "energy_ratio", "ac_snn", "mac_ann", "lam", "samples"):
        assert key in payload
    assert payload["ann_accuracy"] > 90 and payload["accuracy"] > 85
    assert 0 < payload["energy_ratio"] < 1
    m = load(str(out))                       # weights_only load
    assert m.config["trials"] == 8 and m.search["trials_completed"] == 8
    assert m.source["sha256"]


def test_evaluate_and_inspect_json(converted, digits_pt2, tmp_path):
    out, _ = converted
    r = sfn("evaluate", out, "--data", "sklearn:digits", "--limit", 300, "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["samples"] == 300 and d["backend"] == "torch"
    assert set(["accuracy", "ann_accuracy", "agreement", "energy_ratio", "ac_snn", "mac_ann"]) <= set(d)
    r = sfn("inspect", out, "--json")
    s = json.loads(r.stdout)
    # the digits MLP's first layer is 48 % of its MACs: the default (auto) gives its input a neuron
    assert [x["role"] for x in s["sites"]] == ["input", "post-relu", "post-relu"] and s["pareto_front"]
    assert json.loads(sfn("convert", digits_pt2, "--data", "sklearn:digits", "--scale", 0.3, "--input-encoding",
                          "analog", "-o", tmp_path / "a.sfn.pt", "--json").stdout)["mac_snn"] > 0
    r = sfn("inspect", out)
    assert "SFN sites (3)" in r.stdout and "post-relu" in r.stdout


def test_tune_command_resumes(tmp_path, digits_pt2):
    db = tmp_path / "t.db"
    r1 = sfn("tune", digits_pt2, "--data", "sklearn:digits", "--trials", 3, "--storage", db, "--json",
             "--val-fraction", 0.2)
    r2 = sfn("tune", digits_pt2, "--data", "sklearn:digits", "--trials", 5, "--storage", db, "--json",
             "--val-fraction", 0.2)
    assert r1.returncode == 0 and r2.returncode == 0, r1.stderr + r2.stderr
    a, b = json.loads(r1.stdout), json.loads(r2.stdout)
    assert a["study"] == b["study"] and a["trials_completed"] == 3 and b["trials_completed"] == 5


def _bad(r, *words):
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    for w in words:
        assert w in lines[0], lines[0]


def test_bad_inputs_exit_2_with_one_line(tmp_path, digits_pt2, converted):
    out = tmp_path / "never.pt"
    _bad(sfn("convert", tmp_path / "missing.pt2", "--data", "sklearn:digits", "-o", out, "--scale", 0.3),
         "missing.pt2")
    _bad(sfn("convert", digits_pt2, "--data", "sklearn:digits", "-o", out, "--max-drop", 1, "--levels-if-missed",
             20), "levels_if_missed")             # every ConvertConfig field given as a flag reaches the config
    np.savez(tmp_path / "nokey.npz", images=np.zeros((2, 1, 8, 8), np.float32))
    _bad(sfn("convert", digits_pt2, "--data", tmp_path / "nokey.npz", "-o", out, "--scale", 0.3), "nokey.npz", "x")
    x = np.zeros((4, 1, 8, 8), np.float32)
    x[1, 0, 2, 2] = np.nan
    np.savez(tmp_path / "nan.npz", x=x, y=np.zeros(4, np.int64))
    _bad(sfn("convert", digits_pt2, "--data", tmp_path / "nan.npz", "-o", out, "--scale", 0.3), "NaN")
    np.savez(tmp_path / "shape.npz", x=np.zeros((4, 1, 28, 28), np.float32), y=np.zeros(4, np.int64))
    _bad(sfn("convert", digits_pt2, "--data", tmp_path / "shape.npz", "-o", out, "--scale", 0.3), "28×28")
    np.savez(tmp_path / "empty.npz", x=np.zeros((0, 1, 8, 8), np.float32), y=np.zeros(0, np.int64))
    _bad(sfn("convert", digits_pt2, "--data", tmp_path / "empty.npz", "-o", out, "--scale", 0.3), "empty")
    (tmp_path / "corrupt.pt2").write_bytes(b"not a zip file at all")
    _bad(sfn("convert", tmp_path / "corrupt.pt2", "--data", "sklearn:digits", "-o", out, "--scale", 0.3),
         "corrupt.pt2")
    (tmp_path / "corrupt.npz").write_bytes(b"PK\x03\x04 truncated")
    _bad(sfn("evaluate", converted[0], "--data", tmp_path / "corrupt.npz"), "corrupt.npz")
    _bad(sfn("evaluate", digits_pt2, "--data", "sklearn:digits"), "not a converted")
    _bad(sfn("convert", digits_pt2, "--data", "sklearn:digits", "-o", out, "--scale", 1.5), "scale")
    assert not out.exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp-")]


def test_pickle_refused_without_trust(tmp_path, digits_mlp):
    path = tmp_path / "m.pth"
    torch.save(digits_mlp, path)
    out = tmp_path / "o.pt"
    _bad(sfn("convert", path, "--data", "sklearn:digits", "-o", out, "--scale", 0.3), "--trust-pickle")
    r = sfn("convert", path, "--data", "sklearn:digits", "-o", out, "--scale", 0.3, "--trust-pickle", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["lam"] == 0.3


class _Odd(torch.nn.Module):
    """Two operators no rule covers (a rounding and a floor), one after each of two hidden layers."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = torch.nn.Linear(64, 8), torch.nn.Linear(8, 8), torch.nn.Linear(8, 10)

    def forward(self, x):
        return self.c(torch.floor(self.b(self.a(x.flatten(1)).round())))


def test_unsupported_layer_names_every_node(tmp_path):
    ep = torch.export.export(_Odd().eval(), (torch.zeros(2, 1, 8, 8),))
    torch.export.save(ep, tmp_path / "odd.pt2")
    r = sfn("convert", tmp_path / "odd.pt2", "--data", "sklearn:digits", "-o", tmp_path / "o.pt", "--scale", 0.3)
    _bad(r, "2 unsupported", "round", "floor")


def test_torchvision_model_with_local_weights(tmp_path):
    """torchvision:NAME builds the model (no download) and loads a fine-tuned state dict; its ANN is the model's."""
    import torchvision
    from safetensors.torch import save_file
    torch.manual_seed(0)
    m = torchvision.models.get_model("mobilenet_v3_small", num_classes=4).eval()
    save_file(m.state_dict(), str(tmp_path / "w.safetensors"))
    x = torch.rand(40, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        np.savez(tmp_path / "d.npz", x=x.numpy(), y=m(x).argmax(1).numpy())
    args = ["torchvision:mobilenet_v3_small", "--model-args", "num_classes=4", "--data", tmp_path / "d.npz"]
    r = sfn("convert", *args, "--weights", tmp_path / "w.safetensors", "-o", tmp_path / "m.pt", "--scale", 0.3,
            "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["ann_accuracy"] == 100.0 and out["sites"] > 10        # the labels are this ANN's own predictions
    _bad(sfn("convert", "torchvision:no_such_net", "--data", tmp_path / "d.npz", "-o", tmp_path / "n.pt",
             "--scale", 0.3), "not a torchvision model")
    save_file({"foo": torch.zeros(2)}, str(tmp_path / "bad.safetensors"))
    _bad(sfn("convert", *args, "--weights", tmp_path / "bad.safetensors", "-o", tmp_path / "b.pt", "--scale", 0.3),
         "bad.safetensors", "missing")


def test_timm_model_with_local_weights(tmp_path):
    import timm
    from safetensors.torch import save_file
    args = dict(num_classes=10, img_size=8, patch_size=2, in_chans=1, embed_dim=16, depth=1, num_heads=2)
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, **args)
    save_file(m.state_dict(), str(tmp_path / "w.safetensors"))
    margs = ",".join(f"{k}={v}" for k, v in args.items())
    r = sfn("convert", "timm:vit_tiny_patch16_224", "--model-args", margs, "--weights", tmp_path / "w.safetensors",
            "--data", "sklearn:digits", "-o", tmp_path / "v.pt", "--scale", 0.25, "--json", "--calib-limit", 200)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["sites"] == 9
    bad = tmp_path / "bad.safetensors"
    save_file({"foo": torch.zeros(2)}, str(bad))
    _bad(sfn("convert", "timm:vit_tiny_patch16_224", "--model-args", margs, "--weights", bad, "--data",
             "sklearn:digits", "-o", tmp_path / "v2.pt", "--scale", 0.25), "bad.safetensors", "missing")


def test_export_onnx_simulate_and_evaluate_on_onnx(tmp_path, converted):
    out, _ = converted
    onnx_path = tmp_path / "m.onnx"
    r = sfn("export", "--target", "onnx", out, "-o", onnx_path, "--levels", "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert onnx_path.exists() and info["sites"] == 3 and len(info["outputs"]) == 4     # logits, 3 sites' levels
    r = sfn("simulate", out, "--data", "sklearn:digits", "--backend", "onnx", "--limit", 200, "--json")
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert set(s["timings"]) == {"torch", "onnx"} and s["max_abs_diff"] < 1e-3
    assert s["backends"]["onnx"]["level_agreement"] == 100.0
    assert s["backends"]["onnx"]["prediction_agreement"] == 100.0
    r = sfn("evaluate", out, "--data", "sklearn:digits", "--backend", "onnx", "--limit", 200, "--json")
    e = json.loads(r.stdout)
    t = json.loads(sfn("evaluate", out, "--data", "sklearn:digits", "--limit", 200, "--json").stdout)
    assert e["backend"] == "onnx" and e["accuracy"] == t["accuracy"] and e["ann_accuracy"] == t["ann_accuracy"]
    _bad(sfn("simulate", out, "--data", "mnist:/nonexistent"), "/nonexistent")


def test_report_writes_every_format_and_the_json_contract(converted, tmp_path):
    out, _ = converted
    r = sfn("report", out, "--data", "sklearn:digits", "--limit", 200, "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    for key in ("energy_ratio", "ac_snn", "mac_snn", "mac_ann", "layers", "target"):
        assert key in d
    for layer in d["layers"]:
        assert {"name", "kind", "ac", "mac", "host_ops", "spikes", "neurons", "firing_rate"} <= set(layer)
    assert {"cores", "chips", "energy_j", "latency_s"} <= set(d["target"]) and d["target"]["target"] == "loihi2"
    assert set(d["targets"]) == {"loihi2", "loihi1", "cmos45"}
    for ext in ("html", "md", "json"):
        path = tmp_path / f"report.{ext}"
        r = sfn("report", out, "--data", "sklearn:digits", "--limit", 100, "--target", "cmos45", "-o", path)
        assert r.returncode == 0, r.stderr
        text = path.read_text()
        assert "cmos45" in text
        assert oct(os.stat(path).st_mode & 0o044) != "0o0"           # readable by others, like any file
    assert json.loads((tmp_path / "report.json").read_text())["targets"]["cmos45"]["estimate"]["energy_j"] > 0
    r = sfn("report", out, "--data", "sklearn:digits", "-o", tmp_path / "report.pdf")
    assert r.returncode == 2 and "unknown report format .pdf" in r.stderr


def test_report_compares_scales(converted):
    out, _ = converted
    r = sfn("report", out, "--data", "sklearn:digits", "--limit", 100, "--target", "loihi1",
            "--scale", 0.2, "--scale", 0.6, "--json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)["comparison"]
    assert [row["lam"]["max"] for row in rows] == [0.2, 0.6]
    # a larger λ gives coarser steps, so fewer spikes and synaptic ops
    assert rows[1]["energy_ratio"] < rows[0]["energy_ratio"]


def test_check_exit_codes_and_violations(converted, tmp_path):
    out, _ = converted
    r = sfn("check", out, "--target", "loihi2", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["fits"] is True
    tight = tmp_path / "tight.toml"
    tight.write_text('name = "tight"\nconvention = "event"\nspikes = "graded"\n'
                     '[energy_pj]\nsynop = { value = 1, source = "t" }\n'
                     '[core]\nneurons = { value = 64, source = "t" }\nfan_in = { value = 32, source = "t" }\n'
                     '[chip]\ncores = { value = 4, source = "t" }\n'
                     '[precision]\npayload_bits = { value = 4, source = "t" }\n')
    r = sfn("check", out, "--target", tight, "--json")
    assert r.returncode == 2
    d = json.loads(r.stdout)
    rules = {v["rule"] for v in d["violations"]}
    assert {"fan-in per neuron", "graded spike payload (bits)"} <= rules        # all at once
    assert all(set(v) == {"layer", "rule", "limit", "value", "fix"} for v in d["violations"])
    assert "does not fit tight" in r.stderr
    tight.write_text('name = "tight"\nconvention = "event"\nspikes = "graded"\n[energy_pj]\nsynop = 1\n')
    r = sfn("check", out, "--target", tight)
    assert r.returncode == 2 and "energy_pj.synop" in r.stderr and "source" in r.stderr


def test_export_nir_default_path_summary_and_json(tmp_path, converted):
    import shutil
    out, _ = converted
    model = tmp_path / "model.pt"
    shutil.copy(out, model)
    r = sfn("export", "--target", "nir", model)
    assert r.returncode == 0, r.stderr
    line = r.stdout.strip()
    assert "\n" not in line and "NIR" in line and "neurons" in line and "synapses" in line
    assert (tmp_path / "model.nir").exists()                   # default extension beside the model
    r = sfn("export", "--target", "nir", model, "-o", tmp_path / "x.nir", "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["target"] == "nir" and info["sites"] == 3 and info["bytes"] == (tmp_path / "x.nir").stat().st_size
    assert info["neurons_after"] > info["neurons_before"] == 64 + 64 + 32      # the input neuron's 64, then 64, 32
    _bad(sfn("export", "--target", "nir", model, "--levels"), "onnx only")


def test_simulate_and_evaluate_run_the_written_nir_file(converted):
    out, _ = converted
    r = sfn("simulate", out, "--data", "sklearn:digits", "--backend", "nir", "--limit", 400, "--json")
    assert r.returncode == 0, r.stderr
    nir = json.loads(r.stdout)["backends"]["nir"]
    assert nir["max_abs_diff"] < 1e-4 and nir["prediction_agreement"] == 100.0 and nir["setup_seconds"] > 0
    a = json.loads(sfn("evaluate", out, "--data", "sklearn:digits", "--limit", 400, "--json").stdout)
    b = json.loads(sfn("evaluate", out, "--data", "sklearn:digits", "--limit", 400, "--backend", "nir",
                       "--json").stdout)
    assert b["backend"] == "nir" and b["accuracy"] == a["accuracy"] and b["agreement"] == a["agreement"]
