"""Hostile input, as a careful attacker or an unlucky user supplies it (docs/security.md).

Every case runs one command on damaged, planted, non-regular, aliased or out-of-range input and checks the
whole contract: the exit code, exactly one line on stderr and no traceback, one JSON object on stdout with
``--json``, no marker file from a planted payload, no input file changed or removed, no partial output."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from payloads import pickle_payload, pt2_variants, rewrite_zip, torch_save_payload

from sfn_deploy.cli import main

CLI = [sys.executable, "-m", "sfn_deploy.cli"]
MARKER = "MARKER"


def _damage(path: str, kind: str, out: str) -> str:
    blob = Path(path).read_bytes()
    if kind == "truncated":
        blob = blob[: len(blob) // 2]
    elif kind == "zero":
        blob = b""
    elif kind == "random":
        blob = np.random.default_rng(0).integers(0, 256, len(blob), dtype=np.uint8).tobytes()
    elif kind == "bitflip":
        b = bytearray(blob)
        b[len(b) // 2] ^= 0x10
        blob = bytes(b)
    with open(out, "wb") as f:
        f.write(blob)
    return out


@pytest.fixture(scope="module")
def ws(tmp_path_factory, digits_pt2, digits):
    """A folder of good files and hostile variants of each; the cases below refer to them by name."""
    from sfn_deploy.convert import convert
    from sfn_deploy.exporters.lava import export_lava
    from sfn_deploy.exporters.nir import export_nir
    from sfn_deploy.exporters.onnx import export_onnx
    from sfn_deploy.model_file import content_hash, save
    from sfn_deploy.models import load_model

    d = tmp_path_factory.mktemp("hostile")
    p = lambda name: str(d / name)  # noqa: E731
    shutil.copy(digits_pt2, p("good.pt2"))
    np.savez(p("data.npz"), x=digits.x[:300].numpy(), y=digits.y[:300].numpy())
    net, ident = load_model(p("good.pt2"))
    snn = convert(net, digits, scale=0.2, source=ident)
    save(snn, p("good.sfn.pt"))
    export_onnx(snn, p("good.onnx"))
    export_nir(snn, p("good.nir"))
    export_lava(snn, p("good.lava"), "graded", float(digits.x.abs().max()))
    with open(p("good.toml"), "w") as f:
        f.write("[convert]\nlevels = 4\nscale = 0.2\n")

    # damaged copies of every file format the tool reads
    for src, ext in (("good.pt2", "pt2"), ("good.sfn.pt", "sfn.pt"), ("data.npz", "npz")):
        for kind in ("truncated", "zero", "random", "bitflip"):
            _damage(p(src), kind, p(f"{kind}.{ext}"))
    for kind in ("truncated", "random"):
        shutil.copytree(p("good.lava"), p(f"{kind}_arrays.lava"))
        _damage(p("good.lava/arrays.npz"), kind, p(f"{kind}_arrays.lava/arrays.npz"))
        shutil.copytree(p("good.lava"), p(f"{kind}_manifest.lava"))
        _damage(p("good.lava/manifest.json"), kind, p(f"{kind}_manifest.lava/manifest.json"))
    shutil.copytree(p("good.lava"), p("latency.lava"))
    man = json.loads(Path(p("latency.lava/manifest.json")).read_text())
    for plan in man["plans"].values():
        plan["latency"] += 3
    Path(p("latency.lava/manifest.json")).write_text(json.dumps(man))
    shutil.copytree(p("good.lava"), p("noarrays.lava"))
    os.remove(p("noarrays.lava/arrays.npz"))

    # planted payloads: each would create MARKER in the working folder
    marker = p(MARKER)
    for name, edit in pt2_variants(p("good.pt2"), marker).items():
        rewrite_zip(p("good.pt2"), p(f"planted_{name}.pt2"), edit)
    def unknown_op(rel, blob):          # a hand edit of the program: an operator PyTorch does not have
        if rel.startswith("models/") and rel.endswith(".json"):
            return blob.replace(b"torch.ops.aten.relu.default", b"torch.ops.aten.nosuchop.default")
        return None if rel == "__add__" else blob

    def missing_weight(rel, blob):      # a weights entry the config names is gone
        return None if rel in ("data/weights/weight_0", "__add__") else blob

    def escaping_path(rel, blob):       # a weights config pointing outside its folder
        if rel == "data/weights/model_weights_config.json":
            cfg = json.loads(blob)
            next(iter(cfg["config"].values()))["path_name"] = "../../../etc/passwd"
            return json.dumps(cfg).encode()
        return None if rel == "__add__" else blob

    for name, edit in (("unknown_op", unknown_op), ("missing_weight", missing_weight),
                       ("escaping_path", escaping_path)):
        rewrite_zip(p("good.pt2"), p(f"edited_{name}.pt2"), edit)
    with open(p("planted.sfn.pt"), "wb") as f:
        f.write(torch_save_payload(marker))
    with open(p("planted_weights.pt"), "wb") as f:
        f.write(torch_save_payload(marker))
    with open(p("planted.pt"), "wb") as f:       # a pickled "model" without --trust-pickle
        f.write(pickle_payload(marker))
    np.savez(p("object.npz"), x=np.array([{"a": 1}], dtype=object), y=np.zeros(1, dtype=np.int64))
    shutil.copytree(p("good.lava"), p("object.lava"))
    with np.load(p("good.lava/arrays.npz")) as z:
        arrays = {k: z[k] for k in z.files}
    arrays[next(iter(arrays))] = np.array([{"a": 1}], dtype=object)
    np.savez(p("object.lava/arrays.npz"), **arrays)

    # hand edits with every checksum made consistent again
    raw = torch.load(p("good.sfn.pt"), weights_only=True)
    lin = next(n for n in raw["graph"]["nodes"] if n["op"] == "linear")
    lin["params"]["weight"] = lin["params"]["weight"][:, :-1].clone()
    raw["content_sha256"] = content_hash({k: v for k, v in raw.items() if k != "content_sha256"})
    torch.save(raw, p("wrongshape.sfn.pt"))
    raw = torch.load(p("good.sfn.pt"), weights_only=True)
    lin = next(n for n in raw["graph"]["nodes"] if n["op"] == "linear")
    lin["params"]["weight"][0, 0] = float("nan")
    raw["content_sha256"] = content_hash({k: v for k, v in raw.items() if k != "content_sha256"})
    torch.save(raw, p("nan.sfn.pt"))
    bad = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)).eval()
    bad[1].weight.data[0, 0] = float("nan")
    torch.export.save(torch.export.export(bad, (digits.x[:2],)), p("nan.pt2"))
    huge = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 16), torch.nn.ReLU(),
                               torch.nn.Linear(16, 10)).eval()
    huge[1].weight.data.fill_(3e38)                      # finite weights whose activations overflow to inf
    torch.export.save(torch.export.export(huge, (digits.x[:2],)), p("overflow.pt2"))
    np.savez(p("labels.npz"), x=digits.x[:50].numpy(), y=np.full(50, 50, dtype=np.int64))
    np.savez(p("nanx.npz"), x=np.full((4, 1, 8, 8), np.nan, dtype=np.float32), y=np.zeros(4, dtype=np.int64))
    np.savez(p("intx.npz"), x=np.zeros((4, 1, 8, 8), dtype=np.int64), y=np.zeros(4, dtype=np.int64))
    np.savez(p("nox.npz"), y=np.zeros(4, dtype=np.int64))          # no x (an npz without y is unlabeled data)
    np.savez(p("shape.npz"), x=np.zeros((4, 3, 9, 9), dtype=np.float32), y=np.zeros(4, dtype=np.int64))
    np.savez(p("signals.npz"), x=np.zeros((4, 1, 64), dtype=np.float32), y=np.zeros(4, dtype=np.int64))   # N×C×L
    np.savez(p("rank.npz"), x=np.zeros((4, 1, 2, 8, 8), dtype=np.float32), y=np.zeros(4, dtype=np.int64))

    # configs and target files
    configs = {"section.toml": "[convert]\nlevels = 4\n[evaluate]\nlimit = 5\n",
               "typo.toml": "levels = 4\nlevles = 3\n", "type.toml": "[convert]\nlevels = 'four'\n",
               "syntax.toml": "[convert\nlevels = 4\n", "table.toml": "convert = 5\n",
               "range.toml": "[convert]\nlevels = 1000\n", "nan.toml": "[convert]\nmax_drop = nan\n",
               "target_bad.toml": "name = 'x'\n[energy_pj]\nac = 'cheap'\n"}
    for name, text in configs.items():
        with open(p(name), "w") as f:
            f.write(text)
    with open(p("binary.toml"), "wb") as f:
        f.write(bytes(range(256)))

    # weights for a timm model, damaged
    from safetensors.torch import save_file
    save_file({"w": torch.zeros(3)}, p("good.safetensors"))
    _damage(p("good.safetensors"), "truncated", p("truncated.safetensors"))
    _damage(p("good.safetensors"), "random", p("random.safetensors"))

    # images: one class folder holding a file that is not an image
    os.makedirs(p("images/cat"))
    with open(p("images/cat/broken.png"), "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)

    # non-regular files and aliases
    os.mkfifo(p("fifo.pt2"))
    os.makedirs(p("folder.pt2"))
    os.symlink(p("good.pt2"), p("link.pt2"))
    os.link(p("good.pt2"), p("hard.pt2"))
    os.symlink(p("good.sfn.pt"), p("link.sfn.pt"))
    shutil.copy(p("good.sfn.pt"), p("converted.onnx"))      # its default ONNX output is itself
    shutil.copy(p("good.sfn.pt"), p("converted.json"))      # a name a report could have
    return d


def _snapshot(d) -> dict:
    out = {}
    for root, _dirs, files in os.walk(d):
        for name in files:
            path = os.path.join(root, name)
            if os.path.islink(path) or not os.path.isfile(path):
                out[path] = os.readlink(path) if os.path.islink(path) else "special"
                continue
            with open(path, "rb") as f:
                out[path] = hashlib.sha256(f.read()).hexdigest()
    return out


# (id, arguments with {name} for files in the work folder, exit code, text the error line must contain)
CASES = [
    # planted code in every place a .pt2 could run it
    *[(f"pt2_planted_{v}", ["convert", f"{{planted_{v}.pt2}}", "--data", "sklearn:digits", "--scale", "0.2", "-o",
                             "{out.sfn.pt}"], 2, "refused")
      for v in ("sample_inputs", "pickled_weight", "legacy_weights", "custom_object", "sympy_expr",
                "operator_target", "aot_library")],
    ("tune_planted_pt2", ["tune", "{planted_sample_inputs.pt2}", "--data", "sklearn:digits", "--trials", "2",
                          "--storage", "{t.db}"], 2, "refused"),
    ("sfnpt_planted", ["evaluate", "{planted.sfn.pt}", "--data", "sklearn:digits"], 2, "refused"),
    ("sfnpt_planted_export", ["export", "--target", "onnx", "{planted.sfn.pt}", "-o", "{out.onnx}"], 2, "refused"),
    ("weights_planted", ["convert", "timm:resnet10t", "--model-args", "num_classes=10,in_chans=1", "--weights",
                         "{planted_weights.pt}", "--data", "sklearn:digits", "--scale", "0.2", "-o", "{out.sfn.pt}"],
     2, "refused"),
    ("pickle_model_untrusted", ["convert", "{planted.pt}", "--data", "sklearn:digits", "--scale", "0.2", "-o",
                                "{out.sfn.pt}"], 2, "--trust-pickle"),
    ("npz_object_array", ["evaluate", "{good.sfn.pt}", "--data", "{object.npz}"], 2, "object.npz"),
    ("bundle_object_array", ["simulate", "{object.lava}", "--data", "{data.npz}", "--backend", "lava"], 2,
     "object.lava"),
    # damaged files of every format
    *[(f"pt2_{k}", ["convert", f"{{{k}.pt2}}", "--data", "sklearn:digits", "--scale", "0.2", "-o", "{out.sfn.pt}"],
       2, f"{k}.pt2") for k in ("truncated", "zero", "random", "bitflip")],
    *[(f"sfnpt_{k}", ["evaluate", f"{{{k}.sfn.pt}}", "--data", "sklearn:digits"], 2, f"{k}.sfn.pt")
      for k in ("truncated", "zero", "random", "bitflip")],
    *[(f"pt2_edited_{k}", ["convert", f"{{edited_{k}.pt2}}", "--data", "sklearn:digits", "--scale", "0.2", "-o",
                            "{out.sfn.pt}"], 2, f"edited_{k}.pt2") for k in ("unknown_op", "missing_weight",
                                                                               "escaping_path")],
    ("sfnpt_wrong_shape", ["export", "--target", "onnx", "{wrongshape.sfn.pt}", "-o", "{out.onnx}"], 2,
     "wrongshape.sfn.pt"),
    ("pt2_nan_weight", ["convert", "{nan.pt2}", "--data", "sklearn:digits", "--scale", "0.2", "-o", "{out.sfn.pt}"],
     2, "nan.pt2: parameter"),
    ("pt2_overflowing_activations", ["convert", "{overflow.pt2}", "--data", "sklearn:digits", "--scale", "0.2",
                                     "-o", "{out.sfn.pt}"], 2, "overflow float32"),
    ("sfnpt_nan", ["evaluate", "{nan.sfn.pt}", "--data", "sklearn:digits"], 2, "nan.sfn.pt"),
    *[(f"npz_{k}", ["evaluate", "{good.sfn.pt}", "--data", f"{{{k}.npz}}"], 2, f"{k}.npz")
      for k in ("truncated", "zero", "random", "bitflip", "nanx", "intx", "nox", "shape", "signals", "rank",
                "labels")],
    *[(f"bundle_{k}", ["simulate", f"{{{k}.lava}}", "--data", "{data.npz}", "--backend", "lava"], 2, f"{k}.lava")
      for k in ("truncated_arrays", "random_arrays", "truncated_manifest", "random_manifest", "latency",
                "noarrays")],
    ("weights_truncated", ["convert", "timm:resnet10t", "--model-args", "num_classes=10,in_chans=1", "--weights",
                           "{truncated.safetensors}", "--data", "sklearn:digits", "--scale", "0.2", "-o",
                           "{out.sfn.pt}"], 2, "truncated.safetensors"),
    ("weights_random", ["convert", "timm:resnet10t", "--model-args", "num_classes=10,in_chans=1", "--weights",
                        "{random.safetensors}", "--data", "sklearn:digits", "--scale", "0.2", "-o", "{out.sfn.pt}"],
     2, "random.safetensors"),
    ("onnx_as_model", ["evaluate", "{good.onnx}", "--data", "sklearn:digits"], 2, "good.onnx"),
    ("nir_as_model", ["inspect", "{good.nir}"], 2, "good.nir"),
    ("pt2_as_converted", ["check", "{good.pt2}", "--target", "loihi2"], 2, "good.pt2"),
    ("image_broken", ["evaluate", "{good.sfn.pt}", "--data", "{images}"], 2, "broken.png"),
    ("target_bad", ["report", "{good.sfn.pt}", "--data", "sklearn:digits", "--target", "{target_bad.toml}"], 2,
     "target_bad.toml"),
    # configs
    *[(f"config_{k}", ["convert", "{good.pt2}", "--data", "sklearn:digits", "--config", f"{{{k}.toml}}", "-o",
                       "{out.sfn.pt}"], 2, expect)
      for k, expect in (("section", "evaluate"), ("typo", "levles"), ("type", "levels"), ("syntax", "TOML"),
                        ("table", "convert"), ("range", "levels"), ("nan", "max_drop"), ("binary", "UTF-8"))],
    # non-regular files
    ("model_fifo", ["convert", "{fifo.pt2}", "--data", "sklearn:digits", "--scale", "0.2", "-o", "{out.sfn.pt}"], 2,
     "regular file"),
    ("model_folder", ["convert", "{folder.pt2}", "--data", "sklearn:digits", "--scale", "0.2", "-o",
                      "{out.sfn.pt}"], 2, "folder"),
    ("model_dev_zero", ["convert", "/dev/zero", "--data", "sklearn:digits", "--scale", "0.2", "-o", "{out.sfn.pt}"],
     2, "/dev/zero"),
    ("sfnpt_dev_zero", ["inspect", "/dev/zero"], 2, "/dev/zero"),
    ("config_dev_zero", ["convert", "{good.pt2}", "--data", "sklearn:digits", "--config", "/dev/zero", "-o",
                         "{out.sfn.pt}"], 2, "/dev/zero"),
    ("weights_dev_zero", ["convert", "timm:resnet10t", "--model-args", "num_classes=10,in_chans=1", "--weights",
                          "/dev/zero", "--data", "sklearn:digits", "--scale", "0.2", "-o", "{out.sfn.pt}"], 2,
     "/dev/zero"),
    # outputs that alias inputs, or cannot be written
    ("convert_o_is_input", ["convert", "{good.pt2}", "--data", "sklearn:digits", "--scale", "0.2", "-o",
                            "{good.pt2}"], 2, "input"),
    ("convert_o_dot_slash", ["convert", "{good.pt2}", "--data", "sklearn:digits", "--scale", "0.2", "-o",
                             "{./good.pt2}"], 2, "input"),
    ("convert_o_symlink", ["convert", "{good.pt2}", "--data", "sklearn:digits", "--scale", "0.2", "-o",
                           "{link.pt2}"], 2, "input"),
    ("convert_o_hardlink", ["convert", "{good.pt2}", "--data", "sklearn:digits", "--scale", "0.2", "-o",
                            "{hard.pt2}"], 2, "input"),
    ("convert_o_is_data", ["convert", "{good.pt2}", "--data", "{data.npz}", "--scale", "0.2", "-o", "{data.npz}"],
     2, "input"),
    ("convert_o_is_config", ["convert", "{good.pt2}", "--data", "sklearn:digits", "--config", "{good.toml}", "-o",
                             "{good.toml}"], 2, "input"),
    ("tune_storage_is_model", ["tune", "{good.pt2}", "--data", "sklearn:digits", "--trials", "2", "--storage",
                               "{good.pt2}"], 2, "input"),
    ("tune_o_is_storage", ["tune", "{good.pt2}", "--data", "sklearn:digits", "--trials", "2", "--storage",
                           "{t.db}", "-o", "{t.db}"], 2, "input"),
    ("export_onnx_o_is_input", ["export", "--target", "onnx", "{good.sfn.pt}", "-o", "{good.sfn.pt}"], 2, "input"),
    ("export_nir_o_is_input", ["export", "--target", "nir", "{good.sfn.pt}", "-o", "{link.sfn.pt}"], 2, "input"),
    ("export_lava_o_holds_input", ["export", "--target", "lava", "{good.lava/../good.sfn.pt}", "-o", "{.}"], 2,
     "input"),
    ("export_default_is_input", ["export", "--target", "onnx", "{converted.onnx}"], 2, "input"),
    ("report_o_is_input", ["report", "{converted.json}", "--data", "sklearn:digits", "-o", "{converted.json}"], 2,
     "input"),
    ("export_o_folder", ["export", "--target", "onnx", "{good.sfn.pt}", "-o", "{folder.pt2}"], 2, "folder"),
    ("export_o_dev_full", ["export", "--target", "onnx", "{good.sfn.pt}", "-o", "/dev/full"], 2, "/dev/full"),
    ("export_o_missing_folder", ["export", "--target", "onnx", "{good.sfn.pt}", "-o", "{nowhere/x.onnx}"], 2,
     "does not exist"),
    *[(f"{cmd[0]}_o_empty", [*cmd, "-o", ""], 2, "empty")
      for cmd in (["convert", "{good.pt2}", "--data", "sklearn:digits", "--scale", "0.2"],
                  ["export", "--target", "onnx", "{good.sfn.pt}"],
                  ["report", "{good.sfn.pt}", "--data", "sklearn:digits"])],
    ("timm_unknown", ["convert", "timm:nosuchmodel", "--data", "sklearn:digits", "--scale", "0.2", "-o",
                      "{out.sfn.pt}"], 2, "nosuchmodel"),
    ("timm_bad_args", ["convert", "timm:resnet10t", "--model-args", "num_classes=10,bogus=3", "--data",
                       "sklearn:digits", "--scale", "0.2", "-o", "{out.sfn.pt}"], 2, "bogus"),
    ("export_lava_o_file", ["export", "--target", "lava", "{good.sfn.pt}", "-o", "{good.toml}"], 2, "good.toml"),
    # out-of-range and non-finite options
    *[(f"convert_{opt.strip('-')}_{val}", ["convert", "{good.pt2}", "--data", "sklearn:digits", opt, val, "-o",
                                          "{out.sfn.pt}"], 2, opt.strip("-").replace("-", "_"))
      for opt, val in (("--levels", "0"), ("--levels", "1000"), ("--scale", "nan"), ("--scale", "2"),
                       ("--trials", "0"), ("--val-fraction", "nan"), ("--percentile", "100"),
                       ("--max-drop", "nan"), ("--batch-size", "0"), ("--timesteps", "0"))],
    ("report_levels_0", ["report", "{good.sfn.pt}", "--data", "sklearn:digits", "--levels", "0"], 2, "--levels"),
    ("report_levels_1000", ["report", "{good.sfn.pt}", "--data", "sklearn:digits", "--levels", "1000"], 2,
     "--levels"),
    ("report_scale_nan", ["report", "{good.sfn.pt}", "--data", "sklearn:digits", "--scale", "nan"], 2, "--scale"),
    ("evaluate_batch_0", ["evaluate", "{good.sfn.pt}", "--data", "sklearn:digits", "--batch-size", "0"], 2,
     "--batch-size"),
    ("simulate_threads_neg", ["simulate", "{good.sfn.pt}", "--data", "sklearn:digits", "--threads", "-3"], 2,
     "--threads"),
    ("simulate_limit_0", ["simulate", "{good.sfn.pt}", "--data", "sklearn:digits", "--limit", "0"], 2, "--limit"),
    ("evaluate_precision_torch", ["evaluate", "{good.sfn.pt}", "--data", "sklearn:digits", "--precision",
                                  "fixed_pt"], 2, "--precision"),
    ("mnist_spec_extra", ["evaluate", "{good.sfn.pt}", "--data", "mnist:{.}:0:10:99"], 2, "mnist:"),
    ("mnist_spec_reversed", ["evaluate", "{good.sfn.pt}", "--data", "mnist:{.}:10:5"], 2, "mnist:"),
    ("unknown_option", ["convert", "{good.pt2}", "--data", "sklearn:digits", "--levles", "4", "-o",
                        "{out.sfn.pt}"], 2, "--levles"),
    ("missing_option", ["convert", "{good.pt2}", "-o", "{out.sfn.pt}"], 2, "--data"),
    ("unknown_command", ["deploy", "{good.pt2}"], 2, "deploy"),
    ("bad_storage_url", ["tune", "{good.pt2}", "--data", "sklearn:digits", "--trials", "2", "--storage",
                         "nosuchdb://x"], 2, "storage"),
]


def _expand(args, d):
    out = []
    for a in args:
        while "{" in a:
            i, j = a.index("{"), a.index("}")
            inner = a[i + 1:j]
            a = a[:i] + (str(d) if inner == "." else (str(d / inner) if not inner.startswith("./") else
                                                       "./" + os.path.relpath(d / inner[2:]))) + a[j + 1:]
        out.append(a)
    return out


def check_refused(result_code, stdout, stderr, code, expect, d, before):
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert result_code == code, (result_code, stderr[-2000:])
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr and "weights_only" not in stderr and "warnings above" not in stderr
    assert expect in lines[0], lines[0]
    payload = json.loads(stdout)                    # exactly one JSON object with --json
    assert payload["exit_code"] == code and payload["error"]
    assert not os.path.exists(d / MARKER), "a planted payload ran"
    after = _snapshot(d)
    changed = [p for p in before if after.get(p) != before[p]]
    assert not changed, f"inputs changed or removed: {changed}"
    new = set(after) - set(before)
    assert not new, f"files left behind: {new}"


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_hostile(case, ws, monkeypatch):
    _, args, code, expect = case
    monkeypatch.chdir(ws)
    before = _snapshot(ws)
    r = CliRunner().invoke(main, _expand(args, ws) + ["--json"])
    check_refused(r.exit_code, r.stdout, r.stderr, code, expect, ws, before)


def test_enough_cases():
    assert len(CASES) >= 60


def test_error_without_json_prints_nothing_on_stdout(ws):
    r = CliRunner().invoke(main, ["evaluate", str(ws / "random.sfn.pt"), "--data", "sklearn:digits"])
    assert r.exit_code == 2 and r.stdout == "" and len(r.stderr.splitlines()) == 1


def test_read_only_folder(ws, tmp_path):
    """An output folder the process may not write to: exit 2, one line (root ignores permissions: /sys then)."""
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    folder = None
    for candidate in (str(ro), "/sys"):
        try:
            os.close(os.open(os.path.join(candidate, "probe"), os.O_CREAT | os.O_WRONLY, 0o600))
            os.remove(os.path.join(candidate, "probe"))
        except OSError:
            folder = candidate
            break
    if folder is None:
        pytest.skip("no read-only folder available")
    before = _snapshot(ws)
    r = CliRunner().invoke(main, ["export", "--target", "onnx", str(ws / "good.sfn.pt"), "-o",
                                  os.path.join(str(folder), "x.onnx"), "--json"])
    check_refused(r.exit_code, r.stdout, r.stderr, 2, "x.onnx", ws, before)


def test_guard_code_dropped(ws):
    """Guard code in a .pt2 is never kept (it would be exec'd by ExportedProgram.module())."""
    from sfn_deploy.models import load_model
    ep, _ = load_model(str(ws / "planted_guard_code.pt2"))
    assert not ep._guards_code
    assert not os.path.exists(ws / MARKER)


def test_lava_reexport_onto_bundle_folder(ws, tmp_path):
    """-o onto an existing bundle replaces it, as the default path does."""
    model = tmp_path / "m.sfn.pt"
    shutil.copy(ws / "good.sfn.pt", model)
    for args in (["-o", str(tmp_path / "b.lava")], ["-o", str(tmp_path / "b.lava")], []):
        r = CliRunner().invoke(main, ["export", "--target", "lava", str(model), *args, "--json"])
        assert r.exit_code == 0, r.stderr
    assert sorted(os.listdir(tmp_path)) == ["b.lava", "m.sfn.lava", "m.sfn.pt"]


def _wait_for(pred, timeout=60):
    t0 = time.time()
    while not pred():
        if time.time() - t0 > timeout:
            raise TimeoutError
        time.sleep(0.1)


def _default_sigint() -> None:
    """In the child: Ctrl-C as in a terminal. A native library loaded by an earlier test in this process may have
    set SIGINT to ignored at the C level, which a child inherits and Python then keeps (it was seen to swallow the
    Ctrl-C of the test below when the whole suite ran)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start(args, cwd):
    return subprocess.Popen(CLI + args, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=_default_sigint)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_kill_during_convert_leaves_nothing(ws, tmp_path, sig):
    """Ctrl-C or kill -9 in the λ search: no output, no visible temporary file, the input unchanged; Ctrl-C exits
    130 with one line; the rerun resumes the study and completes."""
    shutil.copy(ws / "good.pt2", tmp_path / "m.pt2")
    before = hashlib.sha256((tmp_path / "m.pt2").read_bytes()).hexdigest()
    db = tmp_path / "s.db"
    args = ["convert", "m.pt2", "--data", "sklearn:digits", "-o", "out.sfn.pt", "--val-fraction", "0.5",
            "--storage", str(db)]
    proc = _start(args + ["--trials", "400"], tmp_path)
    _wait_for(lambda: db.exists() and db.stat().st_size > 0)
    time.sleep(2)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    if sig == signal.SIGINT:
        assert proc.returncode == 130, err
        assert err.strip().splitlines() == ["interrupted"]
    else:
        assert proc.returncode == -signal.SIGKILL
    left = sorted(n for n in os.listdir(tmp_path) if not n.startswith(".tmp-"))
    assert [n for n in left if not n.startswith("s.db-")] == ["m.pt2", "s.db"]     # SQLite's own hot journal may stay
    assert hashlib.sha256((tmp_path / "m.pt2").read_bytes()).hexdigest() == before
    r = subprocess.run(CLI + args + ["--trials", "12", "--json"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["chosen"]
    # a journal SQLite left empty at the kill stays until SQLite next writes, and a rerun that finds its trials
    # already done (fast machines finish 12 before the kill) writes nothing: SQLite's file, not ours
    left = sorted(n for n in os.listdir(tmp_path) if not n.startswith(".tmp-"))
    assert [n for n in left if not n.startswith("s.db-")] == ["m.pt2", "out.sfn.pt", "s.db"]


_HEARTBEAT_INTERRUPTED = """
import sys, threading
import optuna.storages._heartbeat as h
start, where = h.HeartbeatThread.start, sys.argv.pop(1)

def interrupted(self):       # Ctrl-C as Optuna starts a trial's heartbeat thread, before its `with` block is entered
    if where == "inside":    # while Thread.start waits for the new thread to run (as seen in CI)
        real = threading.Event.wait
        def wait(event, timeout=None):
            if threading.current_thread() is not threading.main_thread():   # (tqdm's monitor thread)
                return real(event, timeout)
            threading.Event.wait = real
            raise KeyboardInterrupt
        threading.Event.wait = wait
    start(self)
    raise KeyboardInterrupt

h.HeartbeatThread.start = interrupted
from sfn_deploy.cli import main
main(sys.argv[1:])
"""


@pytest.mark.parametrize("where", ["inside", "after"])
def test_interrupt_that_strands_a_library_thread_still_exits(ws, tmp_path, where):
    """Ctrl-C that lands as Optuna starts a trial's heartbeat thread leaves that thread running for ever (seen in
    CI: "interrupted" printed, then the process never ended); the CLI still exits 130 with its one line."""
    shutil.copy(ws / "good.pt2", tmp_path / "m.pt2")
    r = subprocess.run([sys.executable, "-c", _HEARTBEAT_INTERRUPTED, where, "convert", "m.pt2", "--data",
                        "sklearn:digits", "-o", "out.sfn.pt", "--val-fraction", "0.5", "--storage", "s.db",
                        "--trials", "4"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 130, r.stderr
    assert r.stderr.strip().splitlines() == ["interrupted"]
    assert "out.sfn.pt" not in os.listdir(tmp_path)


_FINALISER_INTERRUPTED = """
import time
import click
from sfn_deploy.cli import command, main

class Pool:
    def __del__(self):
        raise KeyboardInterrupt      # Ctrl-C landing in a library's finaliser

@main.command("work")
@command
def work(as_json):
    p = Pool()
    del p
    time.sleep(20)
    click.echo("went on")

main(["work"])
"""


def test_interrupt_inside_a_finaliser_is_not_swallowed():
    """Python swallows an exception raised in ``__del__`` ("Exception ignored in ..."): a Ctrl-C landing there
    would be lost and the command would go on; the CLI delivers it again and ends with its one line."""
    r = subprocess.run([sys.executable, "-c", _FINALISER_INTERRUPTED], capture_output=True, text=True, timeout=60,
                       preexec_fn=_default_sigint)         # (the CLI delivers it again as a SIGINT)
    assert r.returncode == 130, r.stderr
    assert r.stderr.strip().splitlines() == ["interrupted"]
    assert "went on" not in r.stdout


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_kill_during_export_never_leaves_a_partial_file(ws, tmp_path, sig):
    """A kill at any moment leaves the old output or the complete new one, never a partial one."""
    from sfn_deploy.model_file import load
    shutil.copy(ws / "good.sfn.pt", tmp_path / "m.sfn.pt")
    before = hashlib.sha256((tmp_path / "m.sfn.pt").read_bytes()).hexdigest()
    t0 = time.time()
    subprocess.run(CLI + ["export", "--target", "onnx", "m.sfn.pt", "-o", "whole.onnx"], cwd=tmp_path, check=True,
                   capture_output=True, timeout=60)
    whole = time.time() - t0
    os.remove(tmp_path / "whole.onnx")
    for delay in (0.6 * whole, 0.8 * whole, 0.9 * whole, 0.97 * whole):
        proc = _start(["export", "--target", "onnx", "m.sfn.pt", "-o", "m.onnx"], tmp_path)
        time.sleep(delay)
        proc.send_signal(sig)
        proc.communicate(timeout=60)
        if (tmp_path / "m.onnx").exists():
            import onnx
            onnx.checker.check_model(str(tmp_path / "m.onnx"))
        visible = [n for n in os.listdir(tmp_path) if not n.startswith(".tmp-")]
        assert set(visible) <= {"m.sfn.pt", "m.onnx"}
        if sig == signal.SIGINT:                  # Python unwinds: the temporary file is removed too
            assert visible == os.listdir(tmp_path)
    assert hashlib.sha256((tmp_path / "m.sfn.pt").read_bytes()).hexdigest() == before
    load(str(tmp_path / "m.sfn.pt"))


@pytest.mark.parametrize("name", ["truncated.npz", "random.sfn.pt", "folder.pt2", "fifo.pt2"])
def test_nir_reader_refuses_what_is_not_a_nir_file(ws, name):
    """sfn_deploy.exporters.nir.load_nir (the Python API for a NIR file from elsewhere): one-line UserError."""
    from sfn_deploy.errors import UserError
    from sfn_deploy.exporters.nir import load_nir
    with pytest.raises(UserError) as e:
        load_nir(str(ws / name))
    assert len(str(e.value).splitlines()) == 1 and name in str(e.value)


def test_storage_library_logs_stay_off_stderr(ws):
    """Ctrl-C inside SQLAlchemy's pool finaliser (Optuna's --storage) made it log a traceback before 'interrupted'
    (seen once in CI): without --debug a command silences that logger; the interruption is still reported."""
    import logging
    pool_log = logging.getLogger("sqlalchemy.pool.impl.QueuePool")
    level = logging.getLogger("sqlalchemy").level
    try:
        r = CliRunner().invoke(main, ["inspect", str(ws / "good.sfn.pt"), "--json"])
        assert r.exit_code == 0, r.stderr
        assert not pool_log.isEnabledFor(logging.ERROR)
    finally:
        logging.getLogger("sqlalchemy").setLevel(level)
