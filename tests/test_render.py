"""Rendering real reports (a small MLP on digits) as self-contained HTML, Markdown and terminal text."""
import base64
import copy
import html
import re
from html.parser import HTMLParser

import pytest

from sfn_deploy.convert import convert
from sfn_deploy.render import count, energy, seconds, to_html, to_markdown, to_text
from sfn_deploy.report import build_report, compare, variant

# A core far too small for the MLP: every kind of row (violations, unpriced terms, no timing) gets rendered.
TINY = """
name = "tiny"
description = "a deliberately small core <test & escaping>"
convention = "channel"
spikes = "binary"
[energy_pj]
synop = { value = 20.0, evidence = "proxy", source = "PROXY: test figure" }
[core]
neurons = { value = 16, source = "test" }
fan_in = { value = 32, source = "test" }
[chip]
cores = { value = 4, source = "test" }
"""
TARGETS = ["loihi2", "loihi1", "cmos45"]


@pytest.fixture(scope="module")
def converted(digits, digits_mlp):
    return convert(digits_mlp, digits.limit(200), scale=0.3)


@pytest.fixture(scope="module")
def report(converted, digits, tmp_path_factory):
    tiny = tmp_path_factory.mktemp("targets") / "tiny.toml"
    tiny.write_text(TINY)
    return build_report(converted, digits.limit(200), TARGETS + [str(tiny)], label="mlp λ=0.3")


@pytest.fixture(scope="module")
def page(report):
    return to_html(report)


class Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.attrs = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attrs += [(tag, k, v or "") for k, v in attrs]


def test_numbers():
    assert energy(10.96e-6) == "10.96 µJ" and energy(46.8e-9) == "46.8 nJ" and seconds(321.5e-6) == "321.5 µs"
    assert energy(999.99e-9) == "1 µJ" and energy(0.0) == "0 J" and energy(None) == "—"
    assert count(1234.4) == "1,234" and count(15224666.7) == "15.22 M" and count(None) == "—"


def test_html_is_one_self_contained_document(report, page):
    p = Tags()
    p.feed(page)
    assert [p.tags.count(t) for t in ("html", "head", "body", "style")] == [1, 1, 1, 1]
    assert "link" not in p.tags and "script" not in p.tags
    srcs = [v for tag, k, v in p.attrs if k in ("src", "href")]
    assert len(srcs) == p.tags.count("img") >= 4
    for s in srcs:                                       # every plot is an inline PNG
        assert s.startswith("data:image/png;base64,")
        assert base64.b64decode(s.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert not re.search(r"(src|href)\s*=\s*[\"']?\s*(https?:|//)", page) and "@import" not in page
    assert len(page) < 2_000_000


def test_html_content(report, page):
    assert f"{report.energy_ratio:.4g}" in page and f"{report.energy_ratio_approx:.4g}" in page
    for c, v in report.energy_ratio_by_convention.items():
        assert f"{c} {v:.4g}" in page
    for d in report.layers:
        assert html.escape(d["name"]) in page
    tiny = report.targets["tiny"].mapping
    assert tiny.violations, "the tiny target must produce violations for this test to mean anything"
    for v in tiny.violations:
        assert html.escape(v.layer) in page and html.escape(v.rule) in page
    assert "&lt;test &amp; escaping&gt;" in page and "<test & escaping>" not in page
    assert "PROXY" in page and "not timed" in page


def test_markdown(report):
    md = to_markdown(report)
    for name in report.targets:
        assert f"Target {name}" in md
    assert f"{report.energy_ratio:.4g}" in md and "eq. 44" in md
    e = report.targets["loihi2"].estimate
    assert energy(e.energy_j) in md and f"{e.snn_over_int8_ann:.4g}" in md
    for v in report.targets["tiny"].mapping.violations:
        assert f"| {v.layer} | {v.rule} |" in md
    # cmos45 has no cores and no timing: its row in the planning view says so instead of printing 0
    row = next(line for line in md.splitlines() if "| cmos45 | SNN |" in line)
    assert "not timed" in row and "| — |" in row and "(not back-tested)" in row


def test_text(report):
    txt = to_text(report)
    assert f"{report.energy_ratio:.4g}" in txt
    for name in report.targets:
        assert re.search(rf"^{name} \[", txt, re.M)
    assert "not timed" in txt and "violation:" in txt and "does NOT fit" in txt


def test_none_everywhere(report):
    """Whatever a target leaves unpriced or untimed renders as a dash or a phrase, never an exception."""
    r = copy.deepcopy(report)
    for t in r.targets.values():
        e = t.estimate
        e.energy_static_j = e.snn_over_int8_ann = e.latency_s = e.step_s = e.throughput_per_s = None
        e.stages = []
        a = e.ann
        a.target_j = a.int8_j = a.int8_with_memory_j = a.target_with_memory_j = None
        a.target_label = a.int8_source = ""
        for term in e.energy_terms:
            term.pj_each, term.joules, term.priced, term.source, term.price = None, None, False, "", None
        for layer in e.layers:
            layer.snn_j = layer.ann_target_j = layer.ann_int8_j = None
    r.lam, r.source = {}, {}
    md, txt, page = to_markdown(r), to_text(r), to_html(r)
    assert "not timed" in md and "not priced" in md and "not timed" in txt
    assert "None" not in md and "None" not in txt and "None" not in page


def test_comparison(converted, digits, report):
    other = build_report(variant(converted, scale=0.5), digits.limit(200), TARGETS, label="mlp λ=0.5")
    doc = compare([report, other])
    md = to_markdown(doc)
    lines = md.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("| model |"))
    assert "loihi2 energy" in lines[head] and "cmos45 SNN/int8" in lines[head]
    rows = []
    for line in lines[head + 2:]:
        if not line.startswith("|"):
            break
        rows.append(line)
    assert [r.split(" | ")[0] for r in rows] == ["| mlp λ=0.3", "| mlp λ=0.5"]
    assert f"{other.energy_ratio:.4g}" in rows[1]
    assert md.count("SFN hardware report: ") == 2
    # the tiny target is only in the first report: the second row shows dashes for it
    assert rows[1].count("—") >= 6
    assert len(to_text(doc).splitlines()) == 2
