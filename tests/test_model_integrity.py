"""The converted-model file's integrity: content hash, graph validation on load, refusal of files that are not
converted models (quickly, without torch's text), pickled code, NaN weights in a source model, and outputs that
cannot or must not be written (docs/security.md)."""
import copy
import errno
import json
import os
import stat
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from click.testing import CliRunner

from sfn_deploy import model_file
from sfn_deploy.cli import main
from sfn_deploy.convert import convert
from sfn_deploy.errors import UserError
from sfn_deploy.model_file import atomic_write, load, save

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def saved(digits, digits_mlp, tmp_path_factory):
    """(path, dict as stored) of the digits MLP converted at λ = 0.2."""
    path = str(tmp_path_factory.mktemp("integrity") / "model.sfn.pt")
    save(convert(digits_mlp, digits, scale=0.2), path)
    return path, torch.load(path, weights_only=True)


def resave(d: dict, path: str) -> str:
    """Write a hand-edited model dict the way an editor that knows the format would: with its content hash
    recomputed, so only graph validation can catch the edit."""
    d = dict(d)
    d.pop("content_sha256", None)
    h = getattr(model_file, "content_hash", None)
    if h is not None:
        d["content_sha256"] = h(d)
    torch.save(d, path)
    return path


def node_dict(d: dict, name: str) -> dict:
    return next(n for n in d["graph"]["nodes"] if n["name"] == name)


def refused(path: str, *words: str) -> str:
    with pytest.raises(UserError) as e:
        load(str(path))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(str(path))
    assert "weights_only" not in msg and "Weights only" not in msg     # torch's advice never reaches the user
    for w in words:
        assert w in msg, msg
    return msg


# ---------------------------------------------------------------- content hash

def test_new_files_carry_a_content_hash_that_verifies(saved):
    path, d = saved
    assert isinstance(d.get("content_sha256"), str) and len(d["content_sha256"]) == 64
    assert model_file.content_hash(d) == d["content_sha256"]
    assert model_file.content_hash(load(path).to_dict()) == d["content_sha256"]


def test_content_hash_is_canonical_and_covers_every_value(saved):
    _, d = saved
    h = model_file.content_hash
    base = h(d)
    reordered = dict(reversed(list(d.items())))
    assert h(reordered) == base                                   # key order does not matter
    strided = copy.deepcopy(d)
    w = node_dict(strided, "linear")["params"]["weight"]
    node_dict(strided, "linear")["params"]["weight"] = w.t().contiguous().t()    # same values, other strides
    assert h(strided) == base
    for edit in (lambda e: node_dict(e, "linear")["params"]["weight"].view(-1)[7].add_(1e-6),
                 lambda e: node_dict(e, "sfn_relu")["attrs"].__setitem__("lam", 0.2000001),
                 lambda e: node_dict(e, "linear")["params"].__setitem__(
                     "bias", node_dict(e, "linear")["params"]["bias"].double()),
                 lambda e: e["metrics"].__setitem__("accuracy", 1),
                 lambda e: e["graph"].__setitem__("output", "linear_1")):
        e = copy.deepcopy(d)
        edit(e)
        assert h(e) != base


def test_random_bytes_in_the_middle_are_refused(saved, tmp_path):
    """Bytes overwritten inside the largest tensor record: the archive still reads (torch checks no CRC), the
    network would silently change; the content hash refuses it."""
    path, _ = saved
    data = bytearray(Path(path).read_bytes())
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    mid = start + info.file_size // 2
    data[mid:mid + 16] = os.urandom(16)
    bad = tmp_path / "bad.sfn.pt"
    bad.write_bytes(bytes(data))
    refused(bad, "damaged converted model (content hash does not match)")


def test_random_bytes_anywhere_never_pass_silently(saved, tmp_path):
    """Wherever 64 random bytes land, load refuses with one UserError line or returns the same content."""
    path, d = saved
    data = Path(path).read_bytes()
    gen = torch.Generator().manual_seed(0)
    for k in range(40):
        at = int(torch.randint(0, len(data) - 64, (1,), generator=gen))
        bad = tmp_path / f"bad{k}.sfn.pt"
        bad.write_bytes(data[:at] + os.urandom(64) + data[at + 64:])
        try:
            m = load(str(bad))
        except UserError as e:
            assert "\n" not in str(e) and "weights_only" not in str(e)
            continue
        assert model_file.content_hash(m.to_dict()) == d["content_sha256"]


# ---------------------------------------------------------------- graph validation (hash recomputed)

def test_wrong_shape_weight_is_refused_naming_the_node(saved, tmp_path):
    path, d = saved
    e = copy.deepcopy(d)
    node_dict(e, "linear_1")["params"]["weight"] = torch.randn(32, 63)     # the layer reads 64 features
    refused(resave(e, str(tmp_path / "w.sfn.pt")), "linear_1", "64 features")
    e = copy.deepcopy(d)
    node_dict(e, "linear_2")["params"]["weight"] = torch.randn(12, 32)     # 12 outputs, bias and shape say 10
    refused(resave(e, str(tmp_path / "w2.sfn.pt")), "linear_2")


def test_wrong_shape_bias_is_refused_naming_the_node(saved, tmp_path):
    path, d = saved
    e = copy.deepcopy(d)
    node_dict(e, "linear")["params"]["bias"] = torch.zeros(65)
    refused(resave(e, str(tmp_path / "b.sfn.pt")), "linear", "bias")


@pytest.fixture(scope="module")
def saved_cnn(digits, tmp_path_factory):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 6, 3, padding=1),
                      nn.BatchNorm2d(6), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 4 * 4, 10)).eval()
    path = str(tmp_path_factory.mktemp("integrity") / "cnn.sfn.pt")
    save(convert(m, digits.limit(200), scale=0.3), path)
    return path, torch.load(path, weights_only=True)


def test_cnn_loads_and_wrong_convolutions_are_refused_naming_the_node(saved_cnn, tmp_path):
    path, d = saved_cnn
    load(path)
    convs = [n["name"] for n in d["graph"]["nodes"] if n["op"] == "conv2d"]
    assert len(convs) == 2
    e = copy.deepcopy(d)
    node_dict(e, convs[1])["params"]["weight"] = torch.randn(6, 5, 3, 3)          # 5 input channels, 4 arrive
    refused(resave(e, str(tmp_path / "c1.sfn.pt")), repr(convs[1]), "4 channels")
    e = copy.deepcopy(d)
    node_dict(e, convs[0])["attrs"]["stride"] = [2, 2]                             # 4×4 out where 8×8 is stored
    refused(resave(e, str(tmp_path / "c2.sfn.pt")), repr(convs[0]), "[1, 4, 4, 4]", "[1, 4, 8, 8]")
    e = copy.deepcopy(d)
    node_dict(e, convs[0])["params"]["weight"] = node_dict(e, convs[0])["params"]["weight"].double()
    refused(resave(e, str(tmp_path / "c3.sfn.pt")), repr(convs[0]), "torch.float64")
    e = copy.deepcopy(d)
    del node_dict(e, convs[0])["attrs"]["groups"]
    refused(resave(e, str(tmp_path / "c4.sfn.pt")), repr(convs[0]), "groups")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_nan_or_inf_param_is_refused_naming_node_and_param(saved, tmp_path, value):
    path, d = saved
    e = copy.deepcopy(d)
    node_dict(e, "linear_1")["params"]["weight"][3, 5] = value
    refused(resave(e, str(tmp_path / "nan.sfn.pt")), "'linear_1'", "'weight'", "NaN/Inf")
    e = copy.deepcopy(d)
    node_dict(e, "sfn_relu")["params"]["bounds_pos"][0] = value
    refused(resave(e, str(tmp_path / "nan2.sfn.pt")), "'sfn_relu'", "'bounds_pos'")


def _dangling(e):
    node_dict(e, "linear_1")["inputs"] = ["no_such_node"]


def _forward(e):
    node_dict(e, "linear_1")["inputs"] = ["linear_2"]


def _self(e):
    node_dict(e, "linear_1")["inputs"] = ["linear_1"]


def _empty(e):
    e["graph"]["nodes"] = []


def _no_output(e):
    e["graph"]["output"] = "no_such_node"


def _two_inputs(e):
    nodes = e["graph"]["nodes"]
    nodes.insert(1, {**nodes[0], "name": "input_2"})


def _no_input(e):
    nodes = e["graph"]["nodes"]
    nodes[0].update(op="constant", params={"value": torch.zeros(1, 1, 8, 8)})


def _duplicate(e):
    node_dict(e, "linear_2")["name"] = "linear_1"


def _missing_neuron_attr(e):
    del node_dict(e, "sfn_relu")["attrs"]["theta_pos"]


def _missing_neuron_param(e):
    del node_dict(e, "sfn_relu")["params"]["table"]


def _unsorted_bounds(e):
    b = node_dict(e, "sfn_relu")["params"]["bounds_pos"]
    node_dict(e, "sfn_relu")["params"]["bounds_pos"] = b.flip(0).contiguous()


def _lam_out_of_range(e):
    node_dict(e, "sfn_relu_1")["attrs"]["lam"] = 0.0


def _flatten_attr_missing(e):
    del node_dict(e, "flatten")["attrs"]["start"]


def _extra_input(e):
    node_dict(e, "linear_2")["inputs"] = ["sfn_relu_1", "linear"]


def _stored_shape_lies(e):
    node_dict(e, "linear_1")["shape"] = [1, 31]


def _input_shape_lies(e):
    e["input_shape"] = [1, 8, 9]


@pytest.mark.parametrize("edit,words", [
    pytest.param(_dangling, ("'linear_1'", "no_such_node", "dangling"), id="dangling"),
    pytest.param(_forward, ("'linear_1'", "linear_2", "cycle"), id="forward"),
    pytest.param(_self, ("'linear_1'", "itself"), id="self"),
    pytest.param(_empty, ("no nodes",), id="empty"),
    pytest.param(_no_output, ("no_such_node",), id="no_output"),
    pytest.param(_two_inputs, ("2 input nodes",), id="two_inputs"),
    pytest.param(_no_input, ("0 input nodes",), id="no_input"),
    pytest.param(_duplicate, ("linear_1", "twice"), id="duplicate"),
    pytest.param(_missing_neuron_attr, ("'sfn_relu'", "theta_pos"), id="missing_neuron_attr"),
    pytest.param(_missing_neuron_param, ("'sfn_relu'", "table"), id="missing_neuron_param"),
    pytest.param(_unsorted_bounds, ("'sfn_relu'", "ascending"), id="unsorted_bounds"),
    pytest.param(_lam_out_of_range, ("'sfn_relu_1'", "lam"), id="lam_out_of_range"),
    pytest.param(_flatten_attr_missing, ("'flatten'", "start"), id="flatten_attr_missing"),
    pytest.param(_extra_input, ("'linear_2'", "2 input(s)"), id="extra_input"),
    pytest.param(_stored_shape_lies, ("'linear_1'", "[1, 32]", "[1, 31]"), id="stored_shape_lies"),
    pytest.param(_input_shape_lies, ("input_shape",), id="input_shape_lies"),
])
def test_invalid_graph_is_refused_at_load(saved, tmp_path, edit, words):
    _, d = saved
    e = copy.deepcopy(d)
    edit(e)
    refused(resave(e, str(tmp_path / "g.sfn.pt")), "invalid converted model", *words)


@pytest.mark.parametrize("edit", [
    lambda e: e.__setitem__("graph", "garbage"),
    lambda e: e["graph"].__setitem__("nodes", "garbage"),
    lambda e: e["graph"]["nodes"].__setitem__(2, ["linear", "linear"]),
    lambda e: node_dict(e, "linear").__setitem__("attrs", 3),
    lambda e: node_dict(e, "linear").__setitem__("inputs", "flatten"),
    lambda e: node_dict(e, "linear")["params"].__setitem__("weight", [[1.0]]),
    lambda e: node_dict(e, "linear").__setitem__("shape", "1x64"),
    lambda e: node_dict(e, "linear").__setitem__("bdim", "0"),
    lambda e: e.__setitem__("input_shape", "1x8x8"),
    lambda e: e.__setitem__("metrics", [1, 2]),
    lambda e: e["graph"].__setitem__("timesteps", "one"),
], ids=["graph", "nodes", "node", "attrs", "inputs", "param", "shape", "bdim", "input_shape", "metrics",
        "timesteps"])
def test_garbage_anywhere_is_a_user_error(saved, tmp_path, edit):
    _, d = saved
    e = copy.deepcopy(d)
    edit(e)
    msg = refused(resave(e, str(tmp_path / "garbage.sfn.pt")), "invalid converted model")
    assert "Error" not in msg              # said in the file's terms, not as a Python exception's text


def test_old_files_without_a_hash_load_and_are_validated(saved, tmp_path):
    """Files written before the hash existed: accepted, with the full graph validation."""
    path, d = saved
    old = {k: v for k, v in d.items() if k != "content_sha256"}
    torch.save(old, tmp_path / "old.sfn.pt")
    m = load(str(tmp_path / "old.sfn.pt"))
    assert [n.name for n in m.graph.nodes] == [n["name"] for n in d["graph"]["nodes"]]
    e = copy.deepcopy(old)
    node_dict(e, "linear_1")["params"]["weight"] = torch.randn(32, 63)
    torch.save(e, tmp_path / "old_bad.sfn.pt")
    refused(tmp_path / "old_bad.sfn.pt", "linear_1")


def test_a_hash_of_the_wrong_type_is_damage(saved, tmp_path):
    _, d = saved
    e = dict(d)
    e["content_sha256"] = 12345
    torch.save(e, tmp_path / "h.sfn.pt")
    refused(tmp_path / "h.sfn.pt", "content hash does not match")


# ---------------------------------------------------------------- files that are not converted models

def test_truncated_empty_random_and_directory_are_refused_quickly(saved, tmp_path):
    path, _ = saved
    data = Path(path).read_bytes()
    (tmp_path / "trunc.sfn.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.sfn.pt").write_bytes(b"")
    (tmp_path / "random.sfn.pt").write_bytes(os.urandom(4 << 20))
    (tmp_path / "adir.sfn.pt").mkdir()
    for name, words in (("trunc", ("damaged or not a converted sfn-deploy model",)),
                        ("empty", ("empty file",)),
                        ("random", ("not a converted sfn-deploy model",)),
                        ("adir", ("is a folder",))):
        t0 = time.perf_counter()
        refused(tmp_path / f"{name}.sfn.pt", *words)
        assert time.perf_counter() - t0 < 2.0, name


def test_device_nodes_and_fifos_are_refused_without_reading(tmp_path):
    """/dev/zero and a FIFO with no writer: an open or read of either never returns; load refuses at once.
    Run in a child process with a timeout, so a hang fails the test instead of stalling the suite."""
    fifo = tmp_path / "pipe.sfn.pt"
    os.mkfifo(fifo)
    paths = [p for p in ("/dev/zero", "/dev/urandom") if os.path.exists(p)] + [str(fifo)]
    code = ("import json, sys\nfrom sfn_deploy.model_file import load\nfrom sfn_deploy.errors import UserError\n"
            "out = {}\nfor p in sys.argv[1:]:\n    try:\n        load(p)\n        out[p] = 'loaded'\n"
            "    except UserError as e:\n        out[p] = str(e)\nprint(json.dumps(out))\n")
    r = subprocess.run([sys.executable, "-c", code, *paths], capture_output=True, text=True, timeout=60,
                       cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout)
    assert "is a character device" in out.get("/dev/zero", "is a character device")
    assert "is a FIFO" in out[str(fifo)]
    assert all("not a regular file" in v for v in out.values()), out


class _Payload:
    """Unpickling this calls open(marker, "w"): the marker file appears if any pickled code runs."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


class _SystemPayload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("kind,global_name", [(_Payload, "open"), (_SystemPayload, "system")])
def test_planted_pickle_payload_is_refused_and_never_runs(saved, tmp_path, kind, global_name):
    _, d = saved
    marker = tmp_path / "marker"
    e = copy.deepcopy(d)
    node_dict(e, "linear")["attrs"]["note"] = kind(str(marker))       # deep inside a valid-looking model
    torch.save(e, tmp_path / "evil.sfn.pt")
    msg = refused(tmp_path / "evil.sfn.pt", "refused: the file holds pickled objects other than tensors and "
                                            "plain data", "loading them could run code", global_name)
    assert not marker.exists()
    r = CliRunner().invoke(main, ["inspect", str(tmp_path / "evil.sfn.pt")])
    assert r.exit_code == 2 and not marker.exists()
    assert "weights_only" not in r.output and "weights_only" not in r.stderr
    assert msg.splitlines()[0] in r.stderr


# ---------------------------------------------------------------- NaN weights in the source model

def test_nan_weights_in_a_source_pt2_are_refused_at_conversion(digits, digits_mlp, tmp_path):
    m = copy.deepcopy(digits_mlp)
    with torch.no_grad():
        m[3].weight[4, 2] = float("nan")
    ep = torch.export.export(m, (digits.x[:2],), dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},))
    path = str(tmp_path / "nan.pt2")
    torch.export.save(ep, path)
    from sfn_deploy.models import load_model
    with pytest.raises(UserError, match=r"nan\.pt2: parameter '3\.weight' holds NaN/Inf values"):
        load_model(path)                                       # refused as the file is read, naming it
    with pytest.raises(UserError, match=r"parameter '3\.weight' holds NaN/Inf values"):
        convert(torch.export.load(path), digits.limit(200), scale=0.2)    # and by capture, for API callers
    r = CliRunner().invoke(main, ["convert", path, "--data", "sklearn:digits", "-o", str(tmp_path / "o.pt"),
                                  "--scale", "0.2"])
    assert r.exit_code == 2 and "3.weight" in r.stderr and "NaN/Inf" in r.stderr, r.output
    assert not (tmp_path / "o.pt").exists()


def test_inf_buffer_in_a_source_module_is_refused(digits):
    m = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 10)).eval()
    m[2].running_var[1] = float("inf")
    with pytest.raises(UserError, match=r"buffer '2\.running_var' holds NaN/Inf"):
        convert(m, digits.limit(100), scale=0.2)


# ---------------------------------------------------------------- outputs

def _write_text(tmp):
    with open(tmp, "w") as f:
        f.write("new")


def test_atomic_write_refuses_a_directory_target(tmp_path):
    d = tmp_path / "out.sfn.pt"
    d.mkdir()
    with pytest.raises(UserError, match="is a folder"):
        atomic_write(str(d), _write_text)
    assert d.is_dir() and os.listdir(tmp_path) == ["out.sfn.pt"]


def test_atomic_write_turns_enospc_into_a_user_error_and_removes_the_temporary(tmp_path):
    def full(tmp):
        with open(tmp, "w") as f:
            f.write("half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    target = tmp_path / "m.sfn.pt"
    with pytest.raises(UserError) as e:
        atomic_write(str(target), full)
    assert str(e.value) == f"{target}: cannot write (No space left on device)"
    assert os.listdir(tmp_path) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
def test_atomic_write_to_a_read_only_folder_is_a_user_error(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(UserError, match=r"cannot write \(Permission denied\)"):
            atomic_write(str(ro / "m.sfn.pt"), _write_text)
        assert os.listdir(ro) == []
    finally:
        ro.chmod(0o755)


def test_atomic_write_never_replaces_device_nodes_or_fifos(saved, tmp_path):
    """os.replace onto /dev/full as root would replace the device node itself with a file: every existing
    output that is not a regular file is refused before anything is written. A FIFO and (where mknod is
    allowed) a private copy of /dev/full are tried first, so /dev/full itself is only reached when the
    refusal works."""
    _, d = saved
    model = load(saved[0])
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    targets = [fifo]
    if os.geteuid() == 0 and os.path.exists("/dev/full"):
        node = tmp_path / "full"
        try:
            os.mknod(node, 0o666 | stat.S_IFCHR, os.stat("/dev/full").st_rdev)
            targets.append(node)
        except OSError:
            pass
    for t in targets:
        before = os.stat(t).st_mode
        with pytest.raises(UserError, match="not a regular file"):
            save(model, str(t))
        assert os.stat(t).st_mode == before
    assert sorted(os.listdir(tmp_path)) == sorted(p.name for p in targets)
    if not (os.path.exists("/dev/full") and stat.S_ISCHR(os.stat("/dev/full").st_mode)):
        pytest.skip("no /dev/full character device here")
    before = os.stat("/dev/full")
    with pytest.raises(UserError, match=r"/dev/full: exists and is a character device"):
        save(model, "/dev/full")
    after = os.stat("/dev/full")
    assert stat.S_ISCHR(after.st_mode) and after.st_rdev == before.st_rdev and after.st_ino == before.st_ino
    assert not [n for n in os.listdir("/dev") if n.startswith(".tmp-")]
    r = CliRunner().invoke(main, ["export", "--target", "onnx", saved[0], "-o", "/dev/full"])
    assert r.exit_code == 2 and stat.S_ISCHR(os.stat("/dev/full").st_mode), r.output
