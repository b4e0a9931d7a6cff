"""Per-layer parity harness: names the first SFN site where two backends part ways."""
import pytest

from sfn_deploy.convert import convert
from sfn_deploy.parity import compare, format_parity, layer_outputs, parity


@pytest.fixture(scope="module")
def snn(digits_mlp, digits):
    return convert(digits_mlp, digits.limit(400), scale=0.3, input_encoding="analog")    # the two hidden sites


def test_compare_names_the_first_differing_site_and_by_how_much(snn, digits):
    data = digits.limit(50)
    ref = layer_outputs(snn, "torch", data)
    other = {"outputs": ref["outputs"].copy(), "levels": {k: v.copy() for k, v in ref["levels"].items()},
             "pre": {k: v.copy() for k, v in ref["pre"].items()}}
    sites = [s.name for s in snn.sites]
    assert len(sites) == 2
    other["levels"][sites[1]][3, 5] += 2          # one level of the second site, sample 3
    other["pre"][sites[1]][3, 5] += 0.25
    r = compare(snn, ref, other, "torch", "fake")
    assert r.first_differing is not None and r.first_differing.site == sites[1]
    assert r.first_differing.max_level_diff == 2 and r.first_differing.samples_differing == 1
    assert r.first_differing.max_pre_diff == pytest.approx(0.25)
    assert f"first differing layer: {sites[1]}" in format_parity(r)
    other["levels"][sites[0]][:, 0] += 1          # now every sample differs earlier, at the first site
    r = compare(snn, ref, other, "torch", "fake")
    rows = {row.site: row for row in r.layers}
    assert r.first_differing is not None and r.first_differing.site == sites[0]
    assert rows[sites[0]].samples_differing == 50
    assert rows[sites[1]].levels_equal == pytest.approx(100.0 * (1 - 1 / other["levels"][sites[1]].size))


def test_onnx_and_nir_levels_equal_the_reference_layer_by_layer(snn, digits):
    rows = parity(snn, digits.limit(100), ["onnx", "nir"], "torch")
    assert [r.backend for r in rows] == ["onnx", "nir"]
    for r in rows:
        assert r.compared_sites == len(snn.sites) and r.first_differing is None
        assert r.prediction_agreement == 100.0
