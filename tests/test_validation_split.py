"""Validation sized by count, --val-data, the paired drop with its interval, the budget warning (issue 16)."""
import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from sfn_deploy.cli import main
from sfn_deploy.config import VAL_SIZE, load_config
from sfn_deploy.data import Dataset
from sfn_deploy.errors import UserError
from sfn_deploy.evaluation import (
    PairedDrop,
    budget_warning,
    format_drop,
    images_needed,
    paired_drop,
    resolution,
    tango_interval,
)
from sfn_deploy.model_file import load

Z2 = 1.959963984540054 ** 2


def _data(n, name="d"):
    return Dataset(torch.arange(n, dtype=torch.float32).reshape(n, 1, 1, 1), torch.zeros(n, dtype=torch.int64), name)


# ---------------------------------------------------------------- the count rule

def test_count_rule_takes_all_when_small_and_a_seeded_subset_when_large():
    assert VAL_SIZE == 2000 and load_config("", {}).val_size == 2000 and load_config("", {}).val_fraction is None
    small = _data(1797)
    val, rec = small.validation_split(2000)
    assert val is small and (rec.rule, rec.samples, rec.available, rec.source) == ("all", 1797, 1797, "data")
    big = _data(10_000)
    val, rec = big.validation_split(2000, seed=3)
    assert len(val) == 2000 and (rec.rule, rec.samples, rec.available) == ("random subset", 2000, 10_000)
    assert len(set(val.x.flatten().tolist())) == 2000                    # distinct images
    again, _ = big.validation_split(2000, seed=3)
    assert torch.equal(val.x, again.x)                                   # seeded: the same images
    assert not torch.equal(val.x, big.validation_split(2000, seed=4)[0].x)
    part, _ = big.validation_split(500, seed=3)                          # a smaller sample is part of a larger
    assert set(part.x.flatten().tolist()) <= set(val.x.flatten().tolist())


def test_val_fraction_still_works_and_both_at_once_are_refused(tmp_path):
    d = _data(2000)
    val, rec = d.validation_split(2000, fraction=0.02)
    assert len(val) == 40 and rec.rule == "fraction"
    assert torch.equal(val.x, d.split(0.02, 0)[0].x)                     # the images earlier versions used
    with pytest.raises(UserError, match="val_size.*val_fraction"):
        load_config("", {"val_size": 100, "val_fraction": 0.1})
    f = tmp_path / "sfn.toml"
    f.write_text("val-fraction = 0.25\n")
    assert load_config(str(f), {}).val_fraction == 0.25
    cfg = load_config(str(f), {"val_size": 500})                         # a flag replaces the file's sizing
    assert cfg.val_size == 500 and cfg.val_fraction is None
    f.write_text("val-fraction = 0.25\nval-size = 10\n")
    with pytest.raises(UserError, match="both size"):
        load_config(str(f), {})
    with pytest.raises(UserError, match="'val_size'"):
        load_config("", {"val_size": 0})


def test_val_data_is_the_validation_pool():
    d = _data(3000).with_validation(_data(2500, "v"))
    val, rec = d.validation_split(2000)
    assert len(val) == 2000 and (rec.source, rec.data, rec.available) == ("val-data", "v", 2500)
    assert len(d) == 3000                                                # calibration keeps all of --data
    with pytest.raises(UserError, match="--val-size"):
        d.validation_split(2000, fraction=0.1)
    wrong = Dataset(torch.zeros(4, 1, 2, 2), torch.zeros(4, dtype=torch.int64), "w.npz")
    with pytest.raises(UserError, match="w.npz.*1×2×2"):
        _data(10).with_validation(wrong)


def _values(d):
    return set(d.x.flatten().tolist())


def test_check_images_follow_the_validation_images_and_are_none_of_them():
    big = _data(10_000)
    val, _ = big.validation_split(2000, seed=3)
    check, rec = big.check_split(2000, 2000, seed=3)
    assert len(check) == 2000 and not _values(check) & _values(val)
    assert (rec.source, rec.rule, rec.samples, rec.available) == ("data", "not chosen on", 2000, 10_000)
    # the next images of validation's permutation: a larger validation set takes the check's first images
    assert _values(check.limit(500)) <= _values(big.validation_split(2500, seed=3)[0])
    assert len(_data(3000).check_split(2000, 2000)[0]) == 1000           # what is left after validation
    assert _data(1797).check_split(2000, 2000) is None                   # validation took every image
    frac, _ = _data(2000).check_split(2000, 2000, fraction=0.02)         # after --val-fraction's 40 images
    assert len(frac) == 1960 and not _values(frac) & _values(_data(2000).validation_split(2000, 0.02)[0])


def test_with_val_data_the_check_takes_its_rest_else_calibration_images():
    d = _data(3000).with_validation(_data(2500, "v"))
    check, rec = d.check_split(2000, 2000)
    assert len(check) == 500 and (rec.source, rec.data) == ("val-data", "v")
    assert not _values(check) & _values(d.validation_split(2000)[0])
    small = _data(3000).with_validation(_data(1000, "v"))                # validation took all of --val-data
    check, rec = small.check_split(2000, 2000)
    assert len(check) == 2000 and (rec.source, rec.data, rec.available) == ("data", "d", 3000)
    with pytest.raises(UserError, match="'check_size'"):
        load_config("", {"check_size": -1})
    assert load_config("", {}).check_size == VAL_SIZE


# ---------------------------------------------------------------- the paired interval

def test_tango_interval_known_answers():
    # Fagerland, Lydersen & Laake, Statistical Analysis of Contingency Tables (2017), ch. 8: Cavo et al. (2012),
    # n12 = 6, n21 = 16, N = 161: -0.0621 (95 % CI -0.1240 to -0.0054); Bentur et al. (2009), n12 = 1,
    # n21 = 7, N = 21: -0.2857 (-0.5173 to -0.0260)
    low, high = tango_interval(6, 16, 161)
    assert (round(low, 4), round(high, 4)) == (-0.1240, -0.0054)
    low, high = tango_interval(1, 7, 21)
    assert (round(low, 4), round(high, 4)) == (-0.5172, -0.0260)
    d = paired_drop([True] * 59 + [True] * 6 + [False] * 16 + [False] * 80,
                    [True] * 59 + [False] * 6 + [True] * 16 + [False] * 80)
    assert (d.n, d.ann_only, d.snn_only) == (161, 6, 16)
    assert d.points == pytest.approx(-100 * 10 / 161) and d.low == pytest.approx(-12.40, abs=5e-3)


@pytest.mark.parametrize("n", [1, 2, 40, 2000])
def test_zero_discordance_keeps_a_width(n):
    """No disagreement at all: the limits are ±z²/(n + z²) (Wilson's bound for zero events), never zero."""
    low, high = tango_interval(0, 0, n)
    assert high == pytest.approx(Z2 / (n + Z2), rel=1e-9) and low == pytest.approx(-high, rel=1e-9)
    assert resolution(n) == pytest.approx(100 * high, rel=1e-9)
    d = paired_drop(torch.ones(n, dtype=torch.bool), torch.ones(n, dtype=torch.bool))
    assert d.points == 0 and d.high > 0 and d.low < 0


def test_one_image_and_the_extremes_stay_inside_the_range():
    low, high = tango_interval(1, 0, 1)                 # one image, lost: the drop may be anything from −0.59
    assert high == 1.0 and -1 < low < 0
    assert tango_interval(0, 1, 1) == (-1.0, pytest.approx(-low))    # the mirror image
    for b, c, n in ((1, 0, 1), (0, 1, 1), (5, 0, 5), (0, 5, 5), (3, 2, 5), (40, 0, 2000), (0, 40, 2000)):
        low, high = tango_interval(b, c, n)
        assert -1 <= low <= (b - c) / n <= high <= 1
    with pytest.raises(ValueError):
        tango_interval(3, 3, 5)
    with pytest.raises(ValueError):
        paired_drop([], [])


def test_paired_interval_is_tighter_than_two_accuracies():
    """ANN 98 %, SNN 97.6 % on 2,000 images with 8 + 0 discordant pairs: the unpaired Wald interval of the
    difference is about ±0.9 points; the paired one is a fraction of that."""
    n = 2000
    ann = torch.ones(n, dtype=torch.bool)
    ann[:40] = False
    snn = ann.clone()
    snn[40:48] = False
    d = paired_drop(ann, snn)
    assert d.points == pytest.approx(0.4)
    p1, p2 = 0.98, 0.976
    unpaired = 1.96 * math.sqrt(p1 * (1 - p1) / n + p2 * (1 - p2) / n) * 100
    assert d.high - d.low < unpaired
    assert d.low > 0        # 8 images lost, none gained: a real drop
    assert format_drop(d).startswith("drop 0.40 points (95 % CI 0.") and format_drop(d).endswith("n = 2,000)")


def test_format_drop_signs():
    d = paired_drop([True, True, False, True], [True, True, False, True])
    assert format_drop(d) == "drop 0.00 points (95 % CI −48.99 to 48.99, paired, n = 4)"      # z²/(4 + z²)
    tiny = PairedDrop(points=-0.001, low=-0.4, high=0.0004, confidence=0.95, n=100_000, ann_only=0, snn_only=1)
    assert format_drop(tiny) == "drop 0.00 points (95 % CI −0.40 to 0.00, paired, n = 100,000)"   # no "−0.00"


# ---------------------------------------------------------------- the budget warning

def test_budget_warning_rule_and_text():
    assert images_needed(0.3) == 1277 and images_needed(1.0) == 381 and images_needed(0) is None
    for d in (0.1, 0.3, 0.5, 1.0, 2.0):      # the count is the first that resolves the budget
        k = images_needed(d)
        assert resolution(k) <= d < resolution(k - 1)
    assert budget_warning(2000, 0.3, 2000) is None and budget_warning(40, None) is None
    assert budget_warning(40, 0.3, 2000) == (
        "40 validation images resolve 2.5 points (one image; a drop below 8.8 cannot be told from zero); "
        "--max-drop 0.3 needs at least 1,277 (use --val-size 1277)")
    assert budget_warning(1000, 0.3, 1000).endswith("(only 1,000 images are available: give more with --val-data)")
    assert "no finite" in budget_warning(2000, 0.0, 2000)


# ---------------------------------------------------------------- the CLI

def _cli(*args):
    r = CliRunner().invoke(main, [str(a) for a in args])
    return r.exit_code, r.stdout, r.stderr


@pytest.fixture(scope="module")
def val_files(tmp_path_factory, digits):
    root = tmp_path_factory.mktemp("val")
    np.savez(root / "val.npz", x=digits.x[:300].numpy(), y=digits.y[:300].numpy())
    np.savez(root / "wide.npz", x=np.zeros((5, 1, 28, 28), np.float32), y=np.zeros(5, np.int64))
    np.savez(root / "labels.npz", x=digits.x[:5].numpy(), y=np.full(5, 12, np.int64))
    return root


def test_convert_warns_validates_on_val_data_and_records_it(tmp_path, digits_pt2, val_files):
    out = tmp_path / "m.pt"
    code, stdout, stderr = _cli("convert", digits_pt2, "--data", "sklearn:digits", "--val-data",
                                val_files / "val.npz", "-o", out, "--trials", 3, "--max-drop", 0.5, "--json")
    assert code == 0, stderr
    first, *rest = stderr.strip().splitlines()
    assert first == (
        "warning: 300 validation images resolve 0.33 points (one image; a drop below 1.3 cannot be told from "
        "zero); --max-drop 0.5 needs at least 765 (only 300 images are available: give more with --val-data)")
    assert all(x.startswith("warning: on the images the search did not choose on, the drop ") for x in rest)
    d = json.loads(stdout)
    # validation took all of --val-data: the check runs on calibration images (all 1,797, fewer than 2,000)
    assert (d["check"]["source"], d["check"]["samples"], d["check"]["available"]) == ("data", 1797, 1797)
    assert bool(rest) == (d["check"]["drop"]["points"] > 0.5)
    assert list(d)[:3] == ["output", "sites", "lam"] and {"drop", "validation"} <= set(d)
    assert d["samples"] == 300 and d["drop"]["n"] == 300
    assert set(d["drop"]) == {"points", "low", "high", "confidence", "n", "ann_only", "snn_only", "method"}
    assert d["drop"]["low"] <= d["drop"]["points"] <= d["drop"]["high"]
    assert d["drop"]["points"] == pytest.approx(d["ann_accuracy"] - d["accuracy"])
    assert d["validation"] == {"source": "val-data", "data": str(val_files / "val.npz"), "rule": "all",
                               "samples": 300, "available": 300, "seed": 0}
    m = load(str(out))
    assert m.search["val_samples"] == 300 and m.search["validation"]["source"] == "val-data"
    assert m.metrics["validation"] == d["validation"] and m.metrics["drop"] == d["drop"]
    assert m.metrics["calibration_samples"] == 1797                     # calibration used all of --data


def test_convert_warns_when_the_measured_interval_is_wider_than_the_budget(tmp_path, digits_pt2, val_files):
    """300 images pass the image-count rule for 1.5 points, but the SNN and the ANN disagree on enough of them
    that the measured interval is wider than the budget: one line after the fact, with the images that would
    do (the half-width falls as 1/√n); a budget the interval resolves gets none."""
    def run(d):
        code, stdout, stderr = _cli("convert", digits_pt2, "--data", "sklearn:digits", "--val-data",
                                    val_files / "val.npz", "-o", tmp_path / "m.pt", "--trials", 3,
                                    "--max-drop", d, "--input-encoding", "analog", "--check-size", 0, "--json")
        assert code == 0, stderr
        return json.loads(stdout)["drop"], stderr.strip().splitlines()
    drop, lines = run(1.5)
    half = (drop["high"] - drop["low"]) / 2
    assert half > 1.5, drop
    need = math.ceil(300 * (half / 1.5) ** 2)
    assert lines == [f"warning: the 300 validation images measure the drop to ±{half:.2g} points, more than "
                     f"--max-drop 1.5: the drop on other images may pass the budget by that much; about {need:,} "
                     f"would measure it to ±1.5 (--val-size, --val-data)"]
    drop, lines = run(30)
    assert (drop["high"] - drop["low"]) / 2 < 30 and lines == []


def test_convert_without_a_budget_warns_when_the_interval_is_wider_than_the_goal(tmp_path, digits_pt2, val_files):
    """No --max-drop: the search keeps to the default's goal (config.GOAL), so the same after-the-fact line names
    it when the measured interval is wider; a fixed λ keeps to no goal and gets none."""
    from sfn_deploy.config import GOAL
    code, stdout, stderr = _cli("convert", digits_pt2, "--data", "sklearn:digits", "--val-data",
                                val_files / "val.npz", "-o", tmp_path / "m.pt", "--trials", 3, "--json")
    assert code == 0, stderr
    drop = json.loads(stdout)["drop"]
    half = (drop["high"] - drop["low"]) / 2
    assert half > GOAL, drop
    need = math.ceil(300 * (half / GOAL) ** 2)
    assert stderr.strip().splitlines() == [
        f"warning: the 300 validation images measure the drop to ±{half:.2g} points, more than the default's goal "
        f"of {GOAL:g} (no --max-drop): the drop on other images may pass it by that much; about {need:,} would "
        f"measure it to ±{GOAL:g} (--val-size, --val-data)"]
    code, _, stderr = _cli("convert", digits_pt2, "--data", "sklearn:digits", "--val-data", val_files / "val.npz",
                           "-o", tmp_path / "m.pt", "--scale", 0.2)
    assert code == 0 and stderr == "", stderr


def test_convert_default_validates_on_all_small_data(tmp_path, digits_pt2):
    code, stdout, stderr = _cli("convert", digits_pt2, "--data", "sklearn:digits", "-o", tmp_path / "m.pt",
                                "--scale", 0.2)
    assert code == 0 and stderr == "", stderr
    line = next(x for x in stdout.splitlines() if x.startswith("validation ("))
    assert line.startswith("validation (all 1,797 images of --data): ANN ")
    assert "; drop " in line and "paired, n = 1,797)" in line


def test_val_data_refused_cleanly(tmp_path, digits_pt2, val_files):
    out = tmp_path / "m.pt"
    for name, words in (("wide.npz", ("wide.npz", "28×28")), ("labels.npz", ("labels.npz", "12", "10 outputs"))):
        code, _, stderr = _cli("convert", digits_pt2, "--data", "sklearn:digits", "--val-data", val_files / name,
                               "-o", out, "--trials", 2, "--max-drop", 0.5)
        lines = stderr.strip().splitlines()
        assert code == 2 and len(lines) == 1 and all(w in lines[0] for w in words), stderr
    code, _, stderr = _cli("convert", digits_pt2, "--data", "sklearn:digits", "--val-data", val_files / "val.npz",
                           "-o", val_files / "val.npz", "--scale", 0.2)
    assert code == 2 and "val.npz" in stderr                            # an input is never an output
    code, _, stderr = _cli("convert", digits_pt2, "--data", "sklearn:digits", "--val-size", 50, "--val-fraction",
                           0.1, "-o", out, "--scale", 0.2, "--json")
    assert code == 2 and "both size" in stderr
    assert not out.exists()


def test_evaluate_and_report_show_the_drop(tmp_path, digits_pt2, val_files):
    out = tmp_path / "m.pt"
    assert _cli("convert", digits_pt2, "--data", "sklearn:digits", "-o", out, "--scale", 0.2)[0] == 0
    code, stdout, _ = _cli("evaluate", out, "--data", val_files / "val.npz", "--json")
    d = json.loads(stdout)
    assert code == 0 and list(d)[-1] == "drop" and d["drop"]["n"] == 300
    code, stdout, _ = _cli("evaluate", out, "--data", val_files / "val.npz")
    assert "; drop " in stdout.splitlines()[0] and "paired, n = 300)" in stdout
    code, stdout, _ = _cli("report", out, "--data", val_files / "val.npz", "--target", "cmos45", "--json")
    d = json.loads(stdout)
    assert code == 0 and list(d)[-1] == "drop" and d["drop"]["n"] == 300
    code, stdout, _ = _cli("report", out, "--data", val_files / "val.npz", "--target", "cmos45",
                           "-o", tmp_path / "r.md")
    assert code == 0 and stdout.splitlines()[1].startswith("drop ")
    assert "| Drop ANN − SNN | drop " in (tmp_path / "r.md").read_text()


def test_tune_records_the_validation(tmp_path, digits_pt2):
    code, stdout, stderr = _cli("tune", digits_pt2, "--data", "sklearn:digits", "--trials", 2, "--val-size", 100,
                                "--storage", tmp_path / "t.db", "--max-drop", 1, "--json")
    assert code == 0, stderr
    assert stderr.strip() == ("warning: 100 validation images resolve 1 points (one image; a drop below 3.7 cannot "
                              "be told from zero); --max-drop 1 needs at least 381 (use --val-size 381)")
    d = json.loads(stdout)
    assert d["val_samples"] == 100 and "validation" in d and list(d)[-1] == "output"
    assert d["checks"] and d["images"] >= 2 * 100           # the chosen point was checked at its neighbours
    assert d["validation"]["rule"] == "random subset" and d["validation"]["available"] == 1797


def test_tune_with_an_output_checks_its_point_as_convert_does(tmp_path, digits_pt2):
    """``tune -o`` writes what convert would, the check on images the search did not choose on included."""
    args = ("tune", digits_pt2, "--data", "sklearn:digits", "--trials", 2, "--levels", 8, "--val-size", 600,
            "--storage", tmp_path / "t.db", "-o", tmp_path / "m.pt")
    code, stdout, stderr = _cli(*args)
    assert code == 0, stderr
    assert "check (1,197 of 1,797 images of --data the search did not choose on): drop " in stdout   # the rest
    assert load(str(tmp_path / "m.pt")).search["check"]["samples"] == 1197
    code, stdout, _ = _cli(*args[:-2], "--json")                         # without -o: no conversion, no check
    assert code == 0 and "check" not in json.loads(stdout)
