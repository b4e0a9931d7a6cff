"""The back-tests of docs/validation.md (examples/validation.py): predictions have not drifted, and the bands that
`report` prints are the ones the back-tests give."""
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
import validation  # noqa: E402

from sfn_deploy.targets import load_target  # noqa: E402

with open(validation.RESULTS, encoding="utf-8") as _f:
    RESULTS = json.load(_f)
ROWS = {r["id"]: r for r in RESULTS["rows"]}
ENTRIES = {e["id"]: e for e in validation.published()}


def test_every_published_entry_has_a_result_and_a_source():
    assert set(ROWS) == {e["id"] for e in ENTRIES.values() if e.get("target")}
    assert sum(1 for r in ROWS.values() if r["in_band"]) >= 4, "the issue asks for at least four back-tests"
    for e in ENTRIES.values():
        assert e["url"].startswith("https://") and e["quotes"], e["id"]
        assert e.get("measured_energy_j") or e.get("measured_latency_s") or e.get("measured_throughput_per_s")


@pytest.mark.parametrize("bid", sorted(ROWS))
def test_prediction_has_not_drifted(bid):
    """Recomputed from the network, the seeded inputs and the target file as they are now: a change to a price,
    the mapping or the counting shows here, and the table, the bands and results.json must be regenerated."""
    now = validation.predict(ENTRIES[bid])
    was = ROWS[bid]
    for key in ("energy_j", "latency_s", "throughput_per_s"):
        assert now[key] == (None if was[key] is None else pytest.approx(was[key], rel=0.02)), (
            f"{bid}: {key} {now[key]} != {was[key]} in results.json; run `python examples/validation.py --write`")
    assert (now["cores"], now["chips"], now["fits"]) == (was["cores"], was["chips"], was["fits"])


def test_target_bands_are_the_back_tests():
    """Each back-tested target's [band] is the span of its measured ÷ predicted ratios (and ×1), nothing else."""
    assert validation.bands(list(ROWS.values())) == RESULTS["bands"]
    for name, per in RESULTS["bands"].items():
        t = load_target(name)
        assert {k: (b.low, b.high, b.backtests) for k, b in t.bands.items()} == {
            k: (b["low"], b["high"], b["backtests"]) for k, b in per.items()}, name
        for key, b in per.items():
            ratios = [r["ratios"][key] for r in ROWS.values() if r["target"] == name and r["in_band"]
                      and key in r["ratios"]]
            assert b["low"] <= min(ratios) and max(ratios) <= b["high"]


def test_doc_is_current():
    with open(validation.DOC, encoding="utf-8") as f:
        doc = f.read()
    assert doc == validation.markdown(RESULTS["rows"], ENTRIES, RESULTS["bands"]), \
        "docs/validation.md is stale: run `python examples/validation.py --write`"
