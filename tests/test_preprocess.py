"""Images as the model expects them (docs/data.md): preprocessing (timm's data config, options, TOML keys), the
record in the converted model and the exports, and the data sources (mixed-size class folders, CSV/TSV lists,
unlabeled folders) with their untrusted-input rules. Tiny models and a handful of images: fast."""
from __future__ import annotations

import json
import os
import re
import struct
import zlib

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import CIFAR_DIR
from PIL import Image

from sfn_deploy.cli import main
from sfn_deploy.data import NO_LABEL, load_data
from sfn_deploy.errors import UserError
from sfn_deploy.preprocess import Preprocess, image_transform, parse_options, plan, timm_defaults

CIFAR = CIFAR_DIR
CLASSES = ("airplane", "cat", "ship")
SIZES = [(32, 32), (48, 40), (40, 64), (64, 64), (36, 50)]
MEAN, STD = "0.4914,0.4822,0.4465", "0.247,0.243,0.261"


def read(*args, **kwargs):
    """A data set decoded into memory: image sources stream, so their errors appear when they are read."""
    return load_data(*args, **kwargs).in_memory()


def _cifar(cls: str, i: int) -> Image.Image:
    path = os.path.join(CIFAR, cls, f"{i:04d}.jpg")
    if not os.path.exists(path):
        pytest.skip("CIFAR-10 JPEGs not found (set SFN_CIFAR10_DIR)")
    with Image.open(path) as im:
        return im.convert("RGB")


def _folder(root, name: str, first: int, per_class: int = 4) -> str:
    """Class folders of CIFAR photos resized to mixed sizes, saved as JPEG, PNG and WebP in turn."""
    out = os.path.join(str(root), name)
    for c in CLASSES:
        os.makedirs(os.path.join(out, c), exist_ok=True)
        for k in range(per_class):
            i = first + k
            im = _cifar(c, i).resize(SIZES[i % len(SIZES)], Image.BICUBIC)
            im.save(os.path.join(out, c, f"{i:04d}.{('jpg', 'png', 'webp')[i % 3]}"))
    return out


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("pre")
    return {"root": str(root), "photos": _folder(root, "photos", 0), "other": _folder(root, "other", 100, 2)}


def run(*args):
    r = CliRunner().invoke(main, [str(a) for a in args])
    return r.exit_code, r.stdout, r.stderr


def _error(*args) -> str:
    code, out, err = run(*args)
    assert code == 2, (code, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


# ---------------------------------------------------------------- the recipe


def test_timm_recipe_is_timms_eval_transform(work):
    """The recipe from a timm model's data config gives the same tensor as timm's own create_transform, bit for
    bit, on a non-square photo; --crop alone keeps timm's crop_pct ratio for the resize."""
    import timm
    from timm.data import create_transform, resolve_model_data_config
    model = timm.create_model("test_resnet", num_classes=3)
    p = timm_defaults(model, "test_resnet", {})
    assert (p.resize, p.crop, p.channels, p.interpolation) == ((168,), (160, 160), 3, "bilinear")
    img = _cifar("cat", 7).resize((70, 50))
    theirs = create_transform(**resolve_model_data_config(model))(img)
    assert torch.equal(image_transform(p)(img), theirs)
    small = timm_defaults(model, "test_resnet", parse_options({"crop": "32"}))
    assert small.resize == (33,) and small.crop == (32, 32)        # floor(32 / 0.95)
    vit = timm.create_model("test_vit", img_size=32, num_classes=3)
    assert timm_defaults(vit, "test_vit", {}).crop == (32, 32)     # the model's own size, not the config's


def test_options_parse_alike_from_flags_and_toml():
    flags = parse_options({"resize": "40", "crop": "32", "mean": MEAN, "std": "0.25", "channels": "3",
                           "interpolation": "Bicubic"})
    toml = parse_options({"resize": 40, "crop": [32, 32], "mean": [0.4914, 0.4822, 0.4465], "std": 0.25,
                          "channels": 3, "interpolation": "bicubic"})
    assert flags == toml == {"resize": (40,), "crop": (32, 32), "mean": (0.4914, 0.4822, 0.4465), "std": (0.25,),
                             "channels": 3, "interpolation": "bicubic"}
    assert parse_options({"resize": "none", "crop": "24,32"}) == {"resize": None, "crop": (24, 32)}
    for bad, why in ((("crop", "x"), "not a whole number"), (("std", "0"), "above 0"), (("mean", "nan"), "finite"),
                     (("channels", "2"), "1 (greyscale) or 3"), (("resize", "1,2,3"), "N or H,W"),
                     (("interpolation", "cubic"), "not one of")):
        with pytest.raises(UserError, match=re.escape(why)):
            parse_options(dict([bad]))
    with pytest.raises(UserError, match="smaller than crop"):
        Preprocess(resize=(28,), crop=(32, 32)).check()
    with pytest.raises(UserError, match="2 values for 3 channel"):
        Preprocess(channels=3, mean=(0.5, 0.5), std=(1.0,)).check()


def test_record_round_trip_and_damage():
    p = Preprocess(channels=3, resize=(40,), crop=(32, 32), interpolation="bicubic", mean=(0.5, 0.4, 0.3),
                   std=(0.2, 0.2, 0.2), origin="test")
    d = json.loads(json.dumps(p.to_dict()))
    assert Preprocess.from_dict(d) == p
    for key, value, why in (("channels", 2, "channels"), ("crop", "abc", "crop"), ("version", 9, "newer"),
                            ("shell", "rm -rf", "unknown key"), ("mean", [float("inf")] * 3, "finite"),
                            ("resize", [20], "smaller than crop"), ("channels", True, "channels")):
        with pytest.raises(ValueError, match=why):
            Preprocess.from_dict({**d, key: value})


def test_a_record_refuses_different_values_and_allows_added_geometry():
    rec = Preprocess(channels=3, resize=(40,), crop=(32, 32), mean=(0.5,), std=(0.5,))
    assert plan(parse_options({"crop": "32", "mean": "0.5"}), recorded=rec) is rec
    with pytest.raises(UserError, match=r"--crop 28×28 differs from the preprocessing recorded in m.sfn.pt "
                                        r"\(crop 32×32\)"):
        plan(parse_options({"crop": "28"}), recorded=rec, recorded_in="m.sfn.pt")
    with pytest.raises(UserError, match=r"--channels 1 differs .* \(channels 3\)"):
        plan({"channels": 1}, recorded=rec)
    bare = Preprocess(channels=3)                  # converted on images used at their own size: may be resized
    assert plan(parse_options({"resize": "32,32"}), recorded=bare).size == (32, 32)
    with pytest.raises(UserError, match="--mean 0.5 differs"):
        plan(parse_options({"mean": "0.5", "std": "0.5"}), recorded=bare)


# ---------------------------------------------------------------- sources


def test_mixed_sizes_need_a_recipe(work):
    with pytest.raises(UserError, match=r"images of different sizes need --resize and/or --crop"):
        read(work["photos"], workers=0)
    ds = read(work["photos"], parse_options({"resize": "40", "crop": "32"}), workers=0)
    assert ds.x.shape == (12, 3, 32, 32) and ds.classes == list(CLASSES) and ds.labeled
    assert ds.y.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert ds.preprocessing is not None and ds.preprocessing.channels == 3
    assert float(ds.x.min()) >= 0.0 and float(ds.x.max()) <= 1.0          # no mean/std: [0, 1] pixels
    two = read(work["photos"], parse_options({"resize": "40", "crop": "32"}), workers=2)
    assert torch.equal(two.x, ds.x) and torch.equal(two.y, ds.y)           # worker processes read the same


def test_csv_and_tsv_lists(work):
    root = work["root"]
    rows = [("photos/cat/0000.jpg", "1"), ("photos/ship/0001.png", "2"), ("photos/airplane/0002.webp", "0")]
    with open(os.path.join(root, "list.csv"), "w") as f:
        f.write("path,label\n" + "".join(f"{p},{lab}\n" for p, lab in rows))
    with open(os.path.join(root, "names.tsv"), "w") as f:
        f.write("".join(f"{p}\t{CLASSES[int(lab)]}\n" for p, lab in rows))
    with open(os.path.join(root, "paths.csv"), "w") as f:
        f.write("".join(f"{p}\n" for p, _ in rows))
    opts = parse_options({"resize": "40", "crop": "32"})
    a = read(os.path.join(root, "list.csv"), opts)
    b = read(os.path.join(root, "names.tsv"), opts, classes=list(CLASSES))
    c = read(os.path.join(root, "paths.csv"), opts)
    assert a.y.tolist() == b.y.tolist() == [1, 2, 0] and b.classes == list(CLASSES)
    assert torch.equal(a.x, b.x) and torch.equal(a.x, c.x)
    assert not c.labeled and c.y.tolist() == [NO_LABEL] * 3
    outside = os.path.join(os.path.dirname(root), "outside.jpg")
    _cifar("cat", 1).save(outside)
    os.symlink(outside, os.path.join(root, "link.jpg"))
    for i, line in enumerate(("../outside.jpg,1", f"{outside},1", "link.jpg,1", "photos/../../outside.jpg,0")):
        path = os.path.join(root, f"bad{i}.csv")
        with open(path, "w") as f:
            f.write(f"photos/cat/0000.jpg,1\n{line}\n")
        with pytest.raises(UserError, match="line 2: .* leads outside the list's folder"):
            read(path, opts)
    for text, why in (("photos/cat/0000.jpg,1\nphotos/cat/0001.png\n", "line 2: no label"),
                      ("photos/cat/0000.jpg,1,2\n", "line 1: expected 'path,label'"),
                      ("photos/cat/0000.jpg,zebra\n", "class 'zebra' is not one of the 3 classes")):
        path = os.path.join(root, "odd.csv")
        with open(path, "w") as f:
            f.write(text)
        with pytest.raises(UserError, match=why):
            read(path, opts, classes=list(CLASSES))


def test_unlabeled_folder_and_class_names(work):
    root = work["root"]
    loose = os.path.join(root, "loose")
    os.makedirs(loose, exist_ok=True)
    for i in range(3):
        _cifar("ship", 200 + i).resize(SIZES[i]).save(os.path.join(loose, f"{i}.png"))
    _cifar("ship", 203).convert("L").save(os.path.join(loose, "grey.png"))      # greyscale: made RGB like the rest
    ds = read(loose, parse_options({"resize": "36", "crop": "32"}), input_shape=[3, 32, 32])
    assert len(ds) == 4 and not ds.labeled and ds.x.shape[1] == 3
    sub = os.path.join(root, "sub")
    for c in ("ship", "cat"):
        os.makedirs(os.path.join(sub, c), exist_ok=True)
        _cifar(c, 300).save(os.path.join(sub, c, "a.jpg"))
    os.makedirs(os.path.join(sub, ".ipynb_checkpoints"), exist_ok=True)    # hidden: not a class
    by_record = read(sub, classes=list(CLASSES))
    assert by_record.y.tolist() == [1, 2]                 # cat, ship: their place among the recorded classes
    assert read(sub).y.tolist() == [0, 1]            # no record: the sorted folder names
    with pytest.raises(UserError, match="class 'ship' is not one of the 2 classes"):
        read(sub, classes=["airplane", "cat"])
    _cifar("cat", 301).save(os.path.join(sub, "stray.jpg"))
    with pytest.raises(UserError, match="stray.jpg: an image beside the class folders"):
        read(sub)


def _png_header(w: int, h: int) -> bytes:
    """A PNG that claims w×h pixels and holds almost nothing (a decompression bomb's header)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b""))


@pytest.mark.parametrize("workers", [0, 2])
def test_damaged_images_are_refused_by_name(work, tmp_path, workers):
    """A corrupt, truncated, bomb-sized or non-image file is refused with one line naming it, also when a worker
    process decodes it; an EPS file is never handed to Ghostscript."""
    good = _cifar("cat", 5)
    cases = {}
    for name, blob in (("corrupt.jpg", b"\xff\xd8\xff\xe0 this is not a jpeg"),
                       ("bomb.png", _png_header(20000, 20000)),
                       ("script.jpg", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n(pwned) print\n")):
        cases[name] = blob
    import io
    buf = io.BytesIO()
    good.save(buf, "JPEG")
    cases["truncated.jpg"] = buf.getvalue()[: len(buf.getvalue()) // 2]
    for name, blob in cases.items():
        folder = tmp_path / name.replace(".", "_") / "cat"
        folder.mkdir(parents=True)
        good.save(folder / "a.jpg")
        (folder / name).write_bytes(blob)
        with pytest.raises(UserError) as e:
            read(str(folder.parent), workers=workers)
        line = str(e.value)
        assert "\n" not in line and line.startswith(str(folder / name)), line
        assert ("decompression-bomb" in line) if name == "bomb.png" else ("not a readable image" in line), line


# ---------------------------------------------------------------- tensors stay as they were


def test_tensor_sources_unchanged_unless_asked(tmp_path):
    digits = load_data("sklearn:digits")
    assert digits.x.shape == (1797, 1, 8, 8) and float(digits.x.max()) == 1.0
    assert digits.preprocessing == Preprocess(channels=1)
    x = np.random.default_rng(0).random((6, 3, 20, 20), dtype=np.float32)
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(6) % 3)
    plain = load_data(str(tmp_path / "d.npz"))
    assert torch.equal(plain.x, torch.from_numpy(x)) and plain.preprocessing is None
    asked = load_data(str(tmp_path / "d.npz"), parse_options({"crop": "16", "mean": "0.5", "std": "0.25"}))
    assert asked.x.shape == (6, 3, 16, 16)
    assert torch.allclose(asked.x, (torch.from_numpy(x)[:, :, 2:18, 2:18] - 0.5) / 0.25)
    with pytest.raises(UserError, match="3 channel.*--channels asks for 1"):
        load_data(str(tmp_path / "d.npz"), {"channels": 1})


# ---------------------------------------------------------------- end to end, as a user


@pytest.fixture(scope="module")
def converted(work):
    out = os.path.join(work["root"], "m.sfn.pt")
    code, stdout, err = run("convert", "timm:test_resnet", "--model-args", "num_classes=3", "--data", work["photos"],
                            "--resize", "40", "--crop", "32", "--mean", MEAN, "--std", STD, "--scale", "0.2",
                            "--workers", "0", "-o", out, "--json")
    assert code == 0, err
    return out


def test_convert_records_and_evaluate_reuses(work, converted):
    from sfn_deploy.model_file import load
    m = load(converted)
    assert m.preprocessing is not None and m.classes == list(CLASSES) and m.input_shape == [3, 32, 32]
    p = m.preprocessing
    assert (p.resize, p.crop, p.interpolation, p.channels) == ((40,), (32, 32), "bilinear", 3)
    assert p.mean == (0.4914, 0.4822, 0.4465) and "timm:test_resnet" in p.origin
    code, out, err = run("evaluate", converted, "--data", work["other"], "--json")
    assert code == 0, err
    r = json.loads(out)
    assert r["samples"] == 6 and r["accuracy"] is not None and "drop" in r
    same = json.loads(run("evaluate", converted, "--data", work["other"], "--crop", "32", "--resize", "40",
                          "--json")[1])
    assert same == r
    line = _error("evaluate", converted, "--data", work["other"], "--crop", "28")
    assert "--crop 28×28 differs" in line and "(crop 32×32)" in line and converted in line
    line = _error("simulate", converted, "--data", work["other"], "--channels", "1")
    assert "--channels 1 differs" in line and "(channels 3)" in line


def test_exports_carry_the_recipe(work, converted):
    import onnx
    path = os.path.join(work["root"], "m.onnx")
    assert run("export", "--target", "onnx", converted, "-o", path)[0] == 0
    props = {p.key: p.value for p in onnx.load(path).metadata_props}
    pre = json.loads(props["sfn_deploy.preprocessing"])
    assert pre["crop"] == [32, 32] and pre["resize"] == [40] and pre["mean"] == [0.4914, 0.4822, 0.4465]
    assert json.loads(props["sfn_deploy.classes"]) == list(CLASSES)
    bundle = os.path.join(work["root"], "m.lava")
    code, _, err = run("export", "--target", "lava", converted, "-o", bundle)
    assert code == 0, err
    with open(os.path.join(bundle, "manifest.json")) as f:
        manifest = json.load(f)
    assert manifest["preprocessing"] == pre and manifest["classes"] == list(CLASSES)


def test_nir_export_and_a_pt2_model_with_options(work, tmp_path):
    """A non-timm model takes the options alone; NIR files carry them in their metadata."""
    nir = pytest.importorskip("nir")
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                              torch.nn.Linear(4 * 14 * 14, 3)).eval()
    ep = torch.export.export(net, (torch.zeros(2, 1, 16, 16),))
    torch.export.save(ep, tmp_path / "net.pt2")
    out = tmp_path / "g.sfn.pt"
    code, _, err = run("convert", tmp_path / "net.pt2", "--data", work["photos"], "--resize", "20", "--crop", "16",
                       "--channels", "1", "--mean", "0.5", "--std", "0.25", "--scale", "0.5", "--workers", "0",
                       "-o", out)
    assert code == 0, err
    code, _, err = run("export", "--target", "nir", out, "-o", tmp_path / "g.nir")
    assert code == 0, err
    meta = nir.read(str(tmp_path / "g.nir")).metadata
    pre = json.loads(meta["sfn_deploy_preprocessing"])
    assert (pre["channels"], pre["crop"], pre["mean"], pre["origin"]) == (1, [16, 16], [0.5], "options")


def test_unlabeled_data_what_each_command_accepts(work, converted, tmp_path):
    loose = tmp_path / "loose"
    loose.mkdir()
    for i in range(4):
        _cifar("cat", 400 + i).resize(SIZES[i]).save(loose / f"{i}.jpg")
    r = json.loads(run("evaluate", converted, "--data", loose, "--json")[1])
    assert r["accuracy"] is None and r["ann_accuracy"] is None and "drop" not in r and 0 <= r["agreement"] <= 100
    code, out, err = run("evaluate", converted, "--data", loose)
    assert code == 0 and "unlabeled: scored against the ANN's top-1" in out, err
    s = json.loads(run("simulate", converted, "--data", loose, "--json")[1])
    assert s["backends"]["torch"]["accuracy"] is None and s["backends"]["torch"]["prediction_agreement"] == 100.0
    rep = json.loads(run("report", converted, "--data", loose, "--target", "cmos45", "--json")[1])
    assert rep["accuracy"] is None and rep["mac_ann"] > 0
    # unlabeled calibration and validation: the search and the report score the SNN against the ANN's top-1
    code, out, err = run("convert", "timm:test_resnet", "--model-args", "num_classes=3", "--data", loose,
                         "--resize", "40", "--crop", "32", "--trials", "2", "--workers", "0", "-o",
                         tmp_path / "v.sfn.pt", "--json")
    assert code == 0, err
    r = json.loads(out)
    assert r["accuracy"] is None and r["drop"] is None and 0 <= r["agreement"] <= 100 and r["samples"] == 4
    code, out, err = run("convert", "timm:test_resnet", "--model-args", "num_classes=3", "--data", loose,
                         "--val-data", work["other"], "--resize", "40", "--crop", "32", "--scale", "0.2",
                         "--workers", "0", "-o", tmp_path / "u.sfn.pt", "--json")
    assert code == 0, err
    assert json.loads(out)["samples"] == 6


def test_config_file_keys_and_flags(work, tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('resize = 40\ncrop = [32, 32]\nmean = "0.5"\nstd = 0.25\nworkers = 0\nscale = 0.2\n')
    out = tmp_path / "c.sfn.pt"
    code, _, err = run("convert", "timm:test_resnet", "--model-args", "num_classes=3", "--data", work["photos"],
                       "--config", cfg, "--crop", "30", "-o", out)
    assert code == 0, err
    from sfn_deploy.model_file import load
    p = load(str(out)).preprocessing
    assert p is not None and (p.resize, p.crop, p.mean, p.std) == ((40,), (30, 30), (0.5,), (0.25,))
    cfg.write_text('crop = "x"\nscale = 0.2\n')
    assert "c.toml: option crop: 'x' is not a whole number" in _error(
        "convert", "timm:test_resnet", "--data", work["photos"], "--config", cfg, "-o", out)


def test_a_tampered_record_is_refused(converted, tmp_path):
    from sfn_deploy.model_file import HASH_KEY, content_hash
    d = torch.load(converted, weights_only=True)
    d["preprocessing"]["crop"] = "32; rm -rf /"
    d[HASH_KEY] = content_hash(d)
    torch.save(d, tmp_path / "t.sfn.pt")
    line = _error("evaluate", tmp_path / "t.sfn.pt", "--data", "sklearn:digits")
    assert "invalid converted model ('preprocessing' crop:" in line


def test_no_output_is_an_image_the_command_reads(work, converted):
    """-o inside an image folder with an image's name, or a file a list names, would change the input: refused."""
    line = _error("convert", "timm:test_resnet", "--data", work["photos"], "--scale", "0.2", "-o",
                  os.path.join(work["photos"], "cat", "new.png"))
    assert "lies in the image folder" in line
    listed = os.path.join(work["root"], "one.csv")
    with open(listed, "w") as f:
        f.write("photos/cat/0000.jpg,1\n")
    line = _error("report", converted, "--data", listed, "-o", os.path.join(work["photos"], "cat", "0000.jpg"))
    assert "is an image that" in line and "lists" in line
    code, out, _ = run("inspect", converted)
    assert code == 0 and "images: 3 channels, resize shorter side 40 (bilinear), centre crop 32×32" in out
    assert "3 classes (airplane, cat, ship)" in out


def test_tune_records_and_a_lava_bundle_reads_photos_with_its_recipe(work, tmp_path):
    """tune -o records the recipe like convert; simulate BUNDLE/ reads photos with the bundle's own record."""
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                              torch.nn.Linear(4 * 14 * 14, 3)).eval()
    torch.export.save(torch.export.export(net, (torch.zeros(2, 3, 16, 16),)), tmp_path / "net.pt2")
    out = tmp_path / "t.sfn.pt"
    code, _, err = run("tune", tmp_path / "net.pt2", "--data", work["photos"], "--resize", "20", "--crop", "16",
                       "--trials", "2", "--storage", tmp_path / "s.db", "--workers", "0", "-o", out)
    assert code == 0, err
    from sfn_deploy.model_file import load
    m = load(str(out))
    assert m.preprocessing is not None and m.preprocessing.crop == (16, 16) and m.classes == list(CLASSES)
    pytest.importorskip("lava.magma")
    assert run("export", "--target", "lava", out, "-o", tmp_path / "t.lava")[0] == 0
    code, stdout, err = run("simulate", tmp_path / "t.lava", "--data", work["other"], "--backend", "lava",
                            "--json")
    assert code == 0, err
    assert json.loads(stdout)["samples"] == 6
    line = _error("simulate", tmp_path / "t.lava", "--data", work["other"], "--backend", "lava", "--crop", "20")
    assert "--crop 20×20 differs from the preprocessing recorded in" in line and "(crop 16×16)" in line
