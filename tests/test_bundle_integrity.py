"""Lava bundle integrity: one checksum over manifest and arrays, structural validation of the plans,
damaged files refused as one-line user errors, before Lava starts.

Every damaged bundle is refused by ``run_lava`` before it starts the Lava subprocess (``Popen`` is
patched to fail the test if called), so these tests take seconds. The checksum is recomputed here
from its documented definition (docs/lava.md, "Bundle format"), independently of the writer, to reach
the structural validation behind it: a writer with a bug, or a foreign one, gets the checksum right."""
import hashlib
import io
import json
import os
import random
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from sfn_deploy.convert import convert
from sfn_deploy.errors import UserError
from sfn_deploy.exporters import lava as lava_mod
from sfn_deploy.exporters.lava import bundle as bundle_mod
from sfn_deploy.exporters.lava import export_lava, load_network, run_lava
from sfn_deploy.exporters.lava.bundle import read_bundle


@pytest.fixture(scope="module")
def snn(digits_mlp, digits):
    return convert(digits_mlp, digits.limit(400), scale=0.3, input_encoding="analog")   # a host op in the bundle


@pytest.fixture(scope="module")
def pristine(snn, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("integrity") / "bundle")
    export_lava(snn, path, input_abs_max=1.0)
    return path


@pytest.fixture
def bundle(pristine, tmp_path):
    path = str(tmp_path / "b")
    shutil.copytree(pristine, path)
    return path


@pytest.fixture
def no_lava(monkeypatch):
    """Fail the test if anything starts the Lava worker."""
    def popen(*a, **k):
        raise AssertionError("the Lava worker was started for a damaged bundle")
    monkeypatch.setattr(lava_mod.subprocess, "Popen", popen)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _manifest(path):
    with open(os.path.join(path, "manifest.json")) as f:
        return json.load(f)


def _save_manifest(path, man, reseal=True):
    """Write the manifest; with ``reseal``, with a correct checksum as docs/lava.md defines it."""
    if reseal:
        with open(os.path.join(path, "arrays.npz"), "rb") as f:
            man["arrays_sha256"] = _sha(f.read())
        body = {k: v for k, v in man.items() if k != "sha256"}
        man["sha256"] = _sha(json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode())
    with open(os.path.join(path, "manifest.json"), "w") as f:
        json.dump(man, f)


def _edit(path, fn, reseal=True):
    man = _manifest(path)
    fn(man)
    _save_manifest(path, man, reseal)


def _arrays(path) -> dict:
    with np.load(os.path.join(path, "arrays.npz")) as z:
        return {k: z[k] for k in z.files}


def _save_arrays(path, arrays, reseal=True):
    np.savez(os.path.join(path, "arrays.npz"), **arrays)        # pickles object arrays, as a foreign writer could
    if reseal:
        _save_manifest(path, _manifest(path))


def _block(man, name, precision="floating_pt"):
    return next(b for b in man["plans"][precision]["blocks"] if b["name"] == name)


def _refused(path, match, precision="floating_pt"):
    """run_lava refuses the bundle with a one-line UserError naming it (and ``match``), before Lava starts."""
    with pytest.raises(UserError, match=match) as e:
        run_lava(path, np.zeros((2, 1, 8, 8)), precision, timeout=60)
    msg = str(e.value)
    assert "\n" not in msg and path in msg, msg
    return msg


# -- the checksum ------------------------------------------------------------------------------------------

def test_a_bundle_carries_one_checksum_over_manifest_and_arrays(pristine):
    man = _manifest(pristine)
    assert man["format_version"] == 2
    with open(os.path.join(pristine, "arrays.npz"), "rb") as f:
        assert man["arrays_sha256"] == _sha(f.read())
    body = {k: v for k, v in man.items() if k != "sha256"}
    assert man["sha256"] == _sha(json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode())
    assert set(read_bundle(pristine)[1]) == {"floating_pt", "fixed_pt"}


@pytest.mark.parametrize("edit", [
    lambda m: m["plans"]["floating_pt"].__setitem__("latency", 5),
    lambda m: m.__setitem__("input_abs_max", 2.0),
    lambda m: _block(m, "dense_linear")["attrs"].__setitem__("graded", False),
    lambda m: m.pop("sha256"),
], ids=["latency", "input_abs_max", "block_attr", "no_checksum"])
def test_an_edited_manifest_is_refused_by_the_checksum(bundle, no_lava, edit):
    _edit(bundle, edit, reseal=False)
    _refused(bundle, "manifest.json does not match its checksum")


def test_a_version_1_bundle_is_refused_with_a_re_export_hint(bundle, no_lava):
    def v1(m):
        m["format_version"] = 1
        m.pop("sha256")
    _edit(bundle, v1, reseal=False)
    _refused(bundle, "format version 1 .*re-export it")


# -- structural validation (checksum recomputed) -----------------------------------------------------------

def _set_n(m):
    b = _block(m, "sfn_sfn_relu_1")
    b["attrs"]["n"], b["attrs"]["shape"] = 31, [31]


def _rename(m):
    _block(m, "sfn_sfn_relu")["name"] = "../../tmp/x"


def _host_op(m):
    _block(m, "input")["attrs"]["nodes"][1]["op"] = "__import__"


def _site_stage(m):
    m["plans"]["floating_pt"]["sites"]["sfn_relu"]["stage"] = 2


def _delay(m):
    _block(m, "output")["attrs"]["inputs"][0]["delay"] = 1


def _stage(m):
    _block(m, "dense_linear_1")["stage"] = 1


def _out_shape(m):
    m["plans"]["floating_pt"]["output_shape"] = [11]


@pytest.mark.parametrize("edit,match", [
    (lambda m: m["plans"]["floating_pt"].__setitem__("latency", 5), r"'latency' is 5; the plan's structure gives 3"),
    (_set_n, r"block sfn_sfn_relu_1: array 'bias' has shape \[32\]; the block's attributes give \[31\]"),
    (_stage, r"block dense_linear_1: stage is 1; its connections give 2"),
    (_delay, r"block output: input port in0 has delay 1"),
    (_site_stage, r"sites\['sfn_relu'\]: stage is 2"),
    (_out_shape, r"block output: port hout0 gives 10 values; 'output_shape' \[11\]"),
    (_rename, r"block name '../../tmp/x' is not a plain identifier"),
    (_host_op, r"block input: attrs.nodes\[1\] \(flatten\) has op '__import__', not a host operation"),
    (lambda m: _block(m, "dense_linear_1")["attrs"].__setitem__("copies", "two"),
     r"block dense_linear_1: attrs.copies"),
], ids=["latency", "neuron_size", "stage", "host_delay", "site_stage", "output_shape", "path_in_name", "host_op",
        "attr_type"])
def test_a_manifest_that_contradicts_itself_is_refused_naming_the_block_or_field(bundle, no_lava, edit, match):
    _edit(bundle, edit)
    _refused(bundle, match)


@pytest.mark.parametrize("conn,match", [
    ({"dst": "nowhere"}, r"connections\[0\]: dst 'nowhere' is not a block of the plan"),
    ({"src_port": "s_up"}, r"connections\[0\]: block dense_linear has no output port 's_up'"),
    ({"dst": "sfn_sfn_relu_1"}, r"connections\[0\]: dense_linear.a_out gives 64 values, sfn_sfn_relu_1.a_in takes 32"),
], ids=["unknown_block", "unknown_port", "size"])
def test_a_connection_to_an_unknown_block_or_port_is_refused(bundle, no_lava, conn, match):
    _edit(bundle, lambda m: m["plans"]["floating_pt"]["connections"][0].update(conn))
    _refused(bundle, match)


def test_a_manifest_that_is_not_plan_shaped_is_refused(bundle, no_lava):
    _edit(bundle, lambda m: m["plans"].__setitem__("floating_pt", ["not", "a", "plan"]))
    _refused(bundle, "floating_pt plan: not an object")


def test_an_array_of_the_wrong_shape_is_refused(bundle, no_lava):
    arrays = _arrays(bundle)
    key = "floating_pt/dense_linear_1/weight"
    assert arrays[key].shape == (32, 64)
    arrays[key] = np.ascontiguousarray(arrays[key].T)             # same values, axes swapped
    _save_arrays(bundle, arrays)
    _refused(bundle, r"block dense_linear_1: array 'weight' has shape \[64, 32\]; attrs \(out_n 32, in_n 64")


def test_a_missing_array_is_refused(bundle, no_lava):
    arrays = _arrays(bundle)
    del arrays["floating_pt/sfn_sfn_relu/thr_pos"]
    _save_arrays(bundle, arrays)
    _refused(bundle, r"block sfn_sfn_relu: array 'thr_pos' \('floating_pt/sfn_sfn_relu/thr_pos'\) is missing")


class _Marker:
    """Unpickling this creates a file: proof that a bundle made code run."""
    path = ""

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_an_object_array_is_refused_without_unpickling_it(bundle, no_lava, tmp_path):
    _Marker.path = str(tmp_path / "pwned")
    arrays = _arrays(bundle)
    arrays["fixed_pt/sfn_sfn_relu/bias"] = np.array([_Marker()] * 64, dtype=object)
    _save_arrays(bundle, arrays)
    _refused(bundle, r"fixed_pt plan: block sfn_sfn_relu: array 'bias' .* is an object array", "fixed_pt")
    with pytest.raises(UserError, match="object array"):
        load_network(bundle, "fixed_pt")
    assert not os.path.exists(_Marker.path)


@pytest.mark.parametrize("value,match", [
    (np.nan, "holds non-finite values"), (np.inf, "holds non-finite values"),
    (0.5, "holds values that are not fixed-point integers"),
    (1e6, "holds values that are not fixed-point integers within ±254"),
    (3.0, "holds odd values"),
], ids=["nan", "inf", "fraction", "beyond_8_bits", "odd"])
def test_non_finite_or_non_integer_fixed_point_values_are_refused(bundle, no_lava, value, match):
    arrays = _arrays(bundle)
    arrays["fixed_pt/dense_linear_1/weight"][3, 4] = value
    _save_arrays(bundle, arrays)
    _refused(bundle, f"fixed_pt plan: block dense_linear_1: array 'weight' {match}", "fixed_pt")


def _raw_member(path, key):
    """arrays.npz rebuilt with ``key`` stored as plain bytes, not an .npy file."""
    arrays = _arrays(path)
    with zipfile.ZipFile(os.path.join(path, "arrays.npz"), "w") as z:
        for k, a in arrays.items():
            if k == key:
                z.writestr(k, b"just some bytes")
            else:
                buf = io.BytesIO()
                np.lib.format.write_array(buf, a)
                z.writestr(k + ".npy", buf.getvalue())
    _save_manifest(path, _manifest(path))


@pytest.mark.parametrize("kind,match", [("complex", "has dtype complex128"), ("bytes", "is not an .npy array"),
                                        ("strings", "has dtype <U1")])
def test_an_array_that_is_not_numbers_is_refused(bundle, no_lava, kind, match):
    key = "floating_pt/sfn_sfn_relu/bias"
    if kind == "bytes":
        _raw_member(bundle, key)
    else:
        arrays = _arrays(bundle)
        arrays[key] = arrays[key].astype(np.complex128) if kind == "complex" else np.array(["x"] * 64)
        _save_arrays(bundle, arrays)
    _refused(bundle, f"block sfn_sfn_relu: array 'bias' .* {match}")


# -- damaged files -----------------------------------------------------------------------------------------

def _truncate(data):
    return data[:len(data) // 2]


DAMAGE = {"truncated": _truncate, "empty": lambda data: b"",
          "random": lambda data: random.Random(0).randbytes(len(data))}


@pytest.mark.parametrize("reseal", [False, True], ids=["as_is", "resealed"])
@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_arrays_are_refused_in_one_line(bundle, no_lava, damage, reseal):
    p = os.path.join(bundle, "arrays.npz")
    with open(p, "rb") as f:
        data = f.read()
    with open(p, "wb") as f:
        f.write(DAMAGE[damage](data))
    if reseal:
        _save_manifest(bundle, _manifest(bundle))
    _refused(bundle, "arrays.npz does not match the manifest's checksum" if not reseal else
             "arrays.npz: damaged arrays file")


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_manifest_is_refused_in_one_line(bundle, no_lava, damage):
    p = os.path.join(bundle, "manifest.json")
    with open(p, "rb") as f:
        data = f.read()
    with open(p, "wb") as f:
        f.write(DAMAGE[damage](data))
    _refused(bundle, "manifest.json: unreadable manifest")


@pytest.mark.parametrize("text,match", [
    ("[1, 2]", "not an sfn-deploy Lava bundle"), ("[" * 100_000, "unreadable manifest"),
    ('{"format": "sfn-deploy/lava-bundle", "format_version": "2"}', "format_version '2'"),
], ids=["list", "deep_nesting", "version_type"])
def test_a_manifest_of_the_wrong_shape_is_refused_in_one_line(bundle, no_lava, text, match):
    with open(os.path.join(bundle, "manifest.json"), "w") as f:
        f.write(text)
    _refused(bundle, match)


def test_no_single_field_edit_gets_past_reading_as_anything_but_a_user_error(pristine, tmp_path):
    """Every leaf of the floating-point plan replaced by a value of another type, checksum recomputed:
    the read either succeeds or is a UserError (never another exception), and never takes Lava."""
    path = str(tmp_path / "b")
    shutil.copytree(pristine, path)
    man = _manifest(pristine)
    leaves = []

    def walk(o, at):
        for k, v in (o.items() if isinstance(o, dict) else enumerate(o)):
            if isinstance(v, (dict, list)) and v:
                walk(v, at + [k])
            else:
                leaves.append(at + [k])
    walk(man["plans"]["floating_pt"], ["plans", "floating_pt"])
    rng = random.Random(0)
    refused = 0
    for at in rng.sample(leaves, min(150, len(leaves))):
        for value in (None, -1, "x", [], {}, 1e300, True):
            m = json.loads(json.dumps(man))
            o = m
            for k in at[:-1]:
                o = o[k]
            if o[at[-1]] == value:
                continue
            o[at[-1]] = value
            _save_manifest(path, m)
            try:
                read_bundle(path)
            except UserError as e:
                assert "\n" not in str(e)
                refused += 1
    assert refused > 500


# -- the CLI -----------------------------------------------------------------------------------------------

def _sfn_deploy(*args):
    exe = os.path.join(os.path.dirname(sys.executable), "sfn-deploy")
    cmd = [exe] if os.path.exists(exe) else [sys.executable, "-m", "sfn_deploy.cli"]
    return subprocess.run(cmd + list(args), capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("damage", ["latency", "array_shape"])
def test_the_cli_refuses_a_damaged_bundle_with_exit_2_and_one_line(bundle, damage):
    if damage == "latency":
        _edit(bundle, lambda m: m["plans"]["floating_pt"].__setitem__("latency", 5), reseal=False)
    else:
        arrays = _arrays(bundle)
        key = "floating_pt/dense_linear_1/weight"
        arrays[key] = np.ascontiguousarray(arrays[key].T)
        _save_arrays(bundle, arrays)
    r = _sfn_deploy("simulate", bundle, "--data", "sklearn:digits", "--backend", "lava")
    assert r.returncode == 2, r.stderr
    assert len(r.stderr.splitlines()) == 1 and r.stderr.startswith("error: ") and bundle in r.stderr, r.stderr
    assert ("checksum" if damage == "latency" else "block dense_linear_1: array 'weight'") in r.stderr


# -- the worker --------------------------------------------------------------------------------------------

def test_the_worker_refuses_a_bundle_other_than_the_one_checked_as_a_user_error(bundle, tmp_path):
    """The worker re-reads the bundle; one whose checksum is not the one its caller checked is not run, and
    the refusal comes back as one line (exit 2), not a traceback."""
    job = {"bundle": bundle, "precision": "floating_pt", "input": str(tmp_path / "x.npy"), "workdir": str(tmp_path),
           "steps": 3, "record": False, "neuron": "sfn", "sha256": "0" * 64}
    with open(tmp_path / "job.json", "w") as f:
        json.dump(job, f)
    r = subprocess.run([sys.executable, "-m", "sfn_deploy.exporters.lava.worker", str(tmp_path / "job.json")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    msg = (tmp_path / "user_error.txt").read_text()
    assert "changed after it was checked" in msg and "\n" not in msg


def test_a_checked_bundle_whose_host_program_fails_in_lava_is_an_internal_error(bundle):
    """Validation does not run host programs: a resealed bundle whose flatten cannot hold its input passes
    the checks, and fails inside Lava; the run ends cleanly (no hang) as an internal error with the child's
    traceback. (tests/test_lava.py has this check without the reseal, from before manifests were checked.)"""
    def reshape(m):
        for b in m["plans"]["floating_pt"]["blocks"]:
            for n in b["attrs"].get("nodes", []):
                if n["op"] == "flatten":
                    n["op"], n["attrs"] = "reshape", {"shape": [7, 7, 7]}     # cannot hold 64 values
    _edit(bundle, reshape)
    read_bundle(bundle)
    with pytest.raises(RuntimeError, match="Lava run failed"):
        run_lava(bundle, np.zeros((3, 1, 8, 8)), timeout=120)


# -- writing -----------------------------------------------------------------------------------------------

def test_a_failed_rewrite_leaves_the_old_bundle_in_place(bundle, snn, monkeypatch):
    before = {f: Path(bundle, f).read_bytes() for f in os.listdir(bundle)}
    parent = os.path.dirname(bundle)

    def crash(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(bundle_mod.np, "savez", crash)              # while the new files are written
    with pytest.raises(OSError, match="disk full"):
        export_lava(snn, bundle, input_abs_max=1.0)
    monkeypatch.undo()
    real = os.rename

    def rename(src, dst):                                          # the new bundle cannot be moved in
        if os.path.basename(src).startswith(".tmp-lava-"):
            raise OSError("rename failed")
        return real(src, dst)
    monkeypatch.setattr(bundle_mod.os, "rename", rename)
    with pytest.raises(OSError, match="rename failed"):
        export_lava(snn, bundle, input_abs_max=1.0)
    monkeypatch.undo()
    assert {f: Path(bundle, f).read_bytes() for f in os.listdir(bundle)} == before
    assert sorted(os.listdir(parent)) == ["b"]                      # no temporary or old folders left
    read_bundle(bundle)
    export_lava(snn, bundle, input_abs_max=1.0)                      # and a rewrite that works replaces it
    assert sorted(os.listdir(parent)) == ["b"] and sorted(os.listdir(bundle)) == ["arrays.npz", "manifest.json"]


def test_writing_over_a_file_or_a_folder_that_is_not_a_bundle_is_refused(snn, tmp_path):
    f = tmp_path / "file"
    f.write_text("mine")
    other = tmp_path / "other"
    other.mkdir()
    (other / "manifest.json").write_text('{"name": "a web app"}')   # a manifest.json, not ours
    for target in (f, other):
        with pytest.raises(UserError, match="not a Lava bundle; refusing"):
            export_lava(snn, str(target), input_abs_max=1.0)
    assert f.read_text() == "mine" and (other / "manifest.json").read_text() == '{"name": "a web app"}'
