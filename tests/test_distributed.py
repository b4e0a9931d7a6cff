"""Data-parallel convert, evaluate and report under torchrun with two gloo ranks on CPU give exactly what one
process gives (issue 17; sfn_deploy/distributed.py): thresholds, op counts, accuracy, the report's figures."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from sfn_deploy.model_file import load

BIN = os.path.dirname(sys.executable)
CLI, TORCHRUN = os.path.join(BIN, "sfn-deploy"), os.path.join(BIN, "torchrun")


def cli(*args, ranks: int = 1, cwd=None) -> dict:
    """The CLI's --json output, run in one process or under torchrun with ``ranks`` gloo processes."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [CLI, *map(str, args), "--json"]
    if ranks > 1:
        cmd = [TORCHRUN, "--standalone", f"--nproc-per-node={ranks}", *cmd]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1, r.stdout[-2000:]         # rank 0 alone prints, and gloo's banner is kept off stdout
    return json.loads(lines[0])


def _thresholds(path: str) -> list:
    m = load(path)
    return [(s.name, s.attrs["theta_pos"], s.attrs["theta_neg"], s.params["hist_pos"].tolist(),
             s.params["mode_value"].tolist(), s.params["mode_share"].tolist()) for s in m.sites]


@pytest.fixture(scope="module")
def converted(digits_pt2, tmp_path_factory):
    """The digits MLP converted at a fixed λ by one process and by two ranks (batches of 100: uneven shares)."""
    root = tmp_path_factory.mktemp("ranks")
    out = {}
    for ranks in (1, 2):
        path = str(root / f"r{ranks}.sfn.pt")
        out[ranks] = (path, cli("convert", digits_pt2, "--data", "sklearn:digits", "--scale", "0.2",
                                "--batch-size", "100", "-o", path, ranks=ranks))
    return out


def test_two_ranks_calibrate_the_same_network_as_one(converted):
    (one, a), (two, b) = converted[1], converted[2]
    assert _thresholds(one) == _thresholds(two)
    assert load(one).metrics["input_abs_max"] == load(two).metrics["input_abs_max"]
    drop = ("output", "convert_seconds")
    assert {k: v for k, v in a.items() if k not in drop} == {k: v for k, v in b.items() if k not in drop}


def test_two_ranks_evaluate_and_report_the_same_figures(converted, tmp_path):
    model = converted[1][0]
    args = ("--data", "sklearn:digits", "--batch-size", "64")
    assert cli("evaluate", model, *args, "--layers") == cli("evaluate", model, *args, "--layers", ranks=2)
    one = cli("report", model, *args, "--target", "loihi2", "--target", "cmos45", "-o", tmp_path / "one.json")
    two = cli("report", model, *args, "--target", "loihi2", "--target", "cmos45", "-o", tmp_path / "two.json",
              ranks=2)
    assert one == two and one["samples"] == 1797
    assert (tmp_path / "one.json").read_text() == (tmp_path / "two.json").read_text()


def test_commands_that_do_not_split_are_refused_under_torchrun(converted, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([TORCHRUN, "--standalone", "--nproc-per-node=2", CLI, "export", "--target", "onnx",
                        converted[1][0], "-o", str(tmp_path / "m.onnx")], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode != 0 and not (tmp_path / "m.onnx").exists()
    assert "error: export runs in one process; under torchrun only convert, evaluate and report" in r.stderr


def test_histograms_merge_exactly_whatever_the_split():
    """Power-of-two ranges: values counted in any order or split give the same bins as counted at once."""
    from sfn_deploy.calibrate import StreamingHistogram, update_signed
    torch.manual_seed(0)
    x = torch.randn(20_000) * torch.logspace(-2, 2, 20_000)
    whole = (StreamingHistogram(256), StreamingHistogram(256))
    update_signed(*whole, x)
    parts = [(StreamingHistogram(256), StreamingHistogram(256)) for _ in range(3)]
    for (p, n), chunk in zip(parts, (x[:50], x[50:9000], x[9000:]), strict=True):
        for piece in chunk.split(777):
            update_signed(p, n, piece)
    for k, h in enumerate(whole):
        hi = max(p[k].hi for p in parts)
        for p in parts:
            p[k].widen(hi / 2)
        assert h.hi == hi and torch.equal(h.counts, sum(p[k].counts for p in parts))


def test_a_damaged_image_on_one_rank_stops_every_rank_with_one_line_each(converted, tmp_path):
    from PIL import Image
    for c in ("0", "1"):
        (tmp_path / "photos" / c).mkdir(parents=True)
        for i in range(4):
            Image.new("L", (8, 8), 40 * i).save(tmp_path / "photos" / c / f"{i}.png")
    (tmp_path / "photos" / "1" / "3.png").write_bytes(b"not a png")      # in the second rank's share
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([TORCHRUN, "--standalone", "--nproc-per-node=2", CLI, "evaluate", converted[1][0], "--data",
                        str(tmp_path / "photos"), "--batch-size", "2", "--workers", "0"], capture_output=True,
                       text=True, env=env, timeout=300)
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert r.returncode != 0 and sorted(errors) == sorted([
        "error: another torchrun rank stopped (its error is above); this rank stops too",
        f"error: {tmp_path / 'photos' / '1' / '3.png'}: not a readable image (not JPEG, PNG, WEBP, BMP, GIF or TIFF)"])


def test_two_ranks_score_output_fidelity_as_one(digits_pt2, tmp_path):
    """A model converted with output fidelity (cosine of the outputs): the ranks' per-sample scores, gathered in
    order, give one process's cosine, interval and counts."""
    out = tmp_path / "cos.sfn.pt"
    cli("convert", digits_pt2, "--data", "sklearn:digits", "--scale", "0.2", "--fidelity", "output", "-o", out)
    args = ("--data", "sklearn:digits", "--batch-size", "64")
    one, two = cli("evaluate", out, *args), cli("evaluate", out, *args, ranks=2)
    assert one == two and one["fidelity"] == "output" and 0 < one["cosine"] <= 1
