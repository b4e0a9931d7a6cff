"""Image folders are streamed (issue 17): convert with a fixed λ, evaluate and report read one batch at a time
and never decode the data set into memory, and give the same numbers as the same images held in memory."""
from __future__ import annotations

import os

import pytest
import torch
from conftest import CIFAR_DIR
from PIL import Image

from sfn_deploy import convert, evaluate
from sfn_deploy.data import Dataset, load_data
from sfn_deploy.models import load_model
from sfn_deploy.preprocess import parse_options
from sfn_deploy.report import build_report

CIFAR = CIFAR_DIR
CLASSES = ("airplane", "cat", "ship")
OPTIONS = {"resize": "36", "crop": "32", "mean": "0.49,0.48,0.45", "std": "0.25,0.24,0.26"}


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Three class folders of 10 CIFAR photos each, at mixed sizes (the preprocessing brings them to 32×32)."""
    root = tmp_path_factory.mktemp("stream") / "photos"
    for c in CLASSES:
        (root / c).mkdir(parents=True)
        for i in range(10):
            path = os.path.join(CIFAR, c, f"{i:04d}.jpg")
            if not os.path.exists(path):
                pytest.skip("CIFAR-10 JPEGs not found (set SFN_CIFAR10_DIR)")
            with Image.open(path) as im:
                im.convert("RGB").resize((32 + 4 * (i % 3), 40 - 2 * (i % 2))).save(root / c / f"{i:02d}.png")
    return str(root)


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return load_model("timm:test_resnet", model_args={"num_classes": 3})[0]


class Decoded:
    """Records how many samples each ``in_memory`` call decodes (the only way a streamed set enters memory)."""

    def __init__(self, monkeypatch):
        self.sizes: list[int] = []
        original = Dataset.in_memory

        def spy(ds, *args, **kwargs):
            if ds.streamed:
                self.sizes.append(len(ds))
            return original(ds, *args, **kwargs)
        monkeypatch.setattr(Dataset, "in_memory", spy)


def test_a_folder_is_streamed_and_reads_like_the_same_images_in_memory(photos):
    ds = load_data(photos, parse_options(OPTIONS))
    assert ds.streamed and len(ds) == 30 and ds.labeled and ds.sample_shape == [3, 32, 32]
    with pytest.raises(RuntimeError, match="streamed"):
        ds.x  # noqa: B018 (the property refuses)
    mem = ds.in_memory()
    assert not mem.streamed and mem.x.shape == (30, 3, 32, 32) and torch.equal(mem.y, ds.y)
    got = torch.cat(list(ds.batches(7)))
    assert torch.equal(got, mem.x)
    part = ds.sample(12, seed=3)
    assert part.streamed and torch.equal(part.in_memory().x, mem.sample(12, seed=3).x)
    assert torch.equal(ds.limit(5).in_memory().x, mem.x[:5]) and ds.abs_max() == float(mem.x.abs().max())
    assert ds.fingerprint() == load_data(photos, parse_options(OPTIONS)).fingerprint() != mem.fingerprint()


def test_convert_evaluate_and_report_never_decode_the_data_set(photos, net, monkeypatch):
    ds = load_data(photos, parse_options(OPTIONS))
    mem = ds.in_memory()
    decoded = Decoded(monkeypatch)
    streamed = convert(net, ds, scale=0.2, batch_size=8)
    ev = evaluate(streamed, ds, batch_size=8)
    rep = build_report(streamed, ds, ["loihi2"], batch_size=8)
    assert decoded.sizes == [2, 8]      # capture traces the model on the first two images; bias correction: one batch
    in_memory = convert(net, mem, scale=0.2, batch_size=8)
    assert streamed.metrics["input_abs_max"] == in_memory.metrics["input_abs_max"] == float(mem.x.abs().max())
    for a, b in zip(streamed.sites, in_memory.sites, strict=True):
        assert (a.attrs["theta_pos"], a.attrs.get("theta_neg")) == (b.attrs["theta_pos"], b.attrs.get("theta_neg"))
    assert ev.to_dict() == evaluate(in_memory, mem, batch_size=8).to_dict()
    assert rep.ac_snn == ev.ac_snn and rep.samples == 30


def test_the_search_decodes_its_validation_images_once(photos, net, monkeypatch):
    ds = load_data(photos, parse_options(OPTIONS))
    decoded = Decoded(monkeypatch)
    convert(net, ds, trials=3, val_size=12, batch_size=8, search="shared")
    assert sorted(decoded.sizes) == [2, 8, 12]      # capture's two, bias correction's batch, the validation images


def test_the_check_streams_its_images_and_reads_as_in_memory(photos, net, monkeypatch):
    """convert's check of its chosen point (here the 18 photos after validation's 12; a 30-point budget needs 9)
    reads them batch by batch, never all at once, and gives the drop the same images give in memory."""
    ds = load_data(photos, parse_options(OPTIONS))
    mem = ds.in_memory()
    decoded = Decoded(monkeypatch)
    opts = dict(trials=2, val_size=12, batch_size=8, search="shared", max_drop=30.0)
    streamed = convert(net, ds, **opts).search["check"]
    assert streamed["samples"] == 18 and 18 not in decoded.sizes
    assert streamed["drop"] == convert(net, mem, **opts).search["check"]["drop"]
