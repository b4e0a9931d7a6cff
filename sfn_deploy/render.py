"""A hardware-planning report (:class:`sfn_deploy.report.Report`) or a comparison
(:class:`sfn_deploy.report.Comparison`) as terminal text, Markdown, or one self-contained HTML page.

Markdown and HTML are written from the same list of blocks (headings, paragraphs, tables,
plots), so both always carry the same numbers. Any value may be None (a term the target does
not price, a target without cores or timing): it prints as "—", "not priced" or "not timed",
never as 0. The HTML page has its style inline and its plots as base64 PNG, so it opens with no
network connection; plots of large models keep the top layers by size so the page stays small.
"""
from __future__ import annotations

import base64
import html
import io
import re
from typing import TypeVar

from .evaluation import format_drop
from .ir import NEURON_OPS
from .report import Comparison, Report, TargetPlan
from .simulators.estimate import Estimate

_T = TypeVar("_T")
DASH = "—"
TOP = 40          # layers per plot: a ViT has hundreds, a readable plot shows the largest
TOP_SITES = 60
CONVENTION_NOTE = ("Conventions for a multi-level spike: spike: a level-y spike is |y| additions (the paper's, "
                   "eq. 43); event: one op per non-zero input per fan-out (NeuroBench, ECMT, Loihi 2 graded "
                   "spikes); channel: one op per active binary threshold channel (Loihi 1).")
_PREFIXES = ((1e9, "G"), (1e6, "M"), (1e3, "k"), (1.0, ""), (1e-3, "m"), (1e-6, "µ"), (1e-9, "n"), (1e-12, "p"),
             (1e-15, "f"))


# ---------------------------------------------------------------- numbers

def si(v: float | None, unit: str) -> str:
    """An SI-prefixed quantity, 4 significant digits ("10.96 µJ", "321.5 µs")."""
    if v is None:
        return DASH
    if v == 0:
        return f"0 {unit}"
    a = abs(v)
    f, p = next(((f, p) for f, p in _PREFIXES if a >= f * 0.99995), _PREFIXES[-1])
    return f"{v / f:.4g} {p}{unit}"


def energy(v: float | None) -> str:
    return si(v, "J")


def seconds(v: float | None) -> str:
    return si(v, "s")


def count(v: float | None) -> str:
    """Counts per inference: thousands separators below a million, then M/G/T ("15.22 M")."""
    if v is None:
        return DASH
    a = abs(v)
    if a < 1e6:
        return f"{v:,.0f}" if a >= 100 or float(v).is_integer() else f"{v:.3g}"
    f, p = next((f, p) for f, p in ((1e12, "T"), (1e9, "G"), (1e6, "M")) if a >= f * 0.99995)
    return f"{v / f:.4g} {p}"


def ratio(v: float | None) -> str:
    """Ratios print with 4 significant digits everywhere (tests and readers can match them)."""
    return DASH if v is None else f"{v:.4g}"


def pct(v: float | None) -> str:
    return DASH if v is None else f"{v:.2f} %"


def banded(text: str, band: dict | None) -> str:
    """A figure with how far measurements fell from this target's estimates ("7.4 µJ (×0.5–×2, 3 back-tests)")."""
    return f"{text} ({band['text']})" if band else f"{text} (not back-tested)"


def _lam(lam: dict) -> str:
    if not lam:
        return DASH
    return f"{lam['min']:g}" if lam["min"] == lam["max"] else f"{lam['min']:g} – {lam['max']:g}"


def _list(xs) -> str:
    return ", ".join(str(x) for x in xs) if xs else DASH


def _span(xs: list[int]) -> str:
    return DASH if not xs else str(min(xs)) if min(xs) == max(xs) else f"{min(xs)}–{max(xs)}"


# ---------------------------------------------------------------- derived facts

def _has_cores(t: TargetPlan) -> bool:
    return bool(t.mapping.cores)


def _bindings(t: TargetPlan) -> str:
    """Which limit set the core count, summed over layers ("neurons per core: 186 cores")."""
    n: dict[str, int] = {}
    for p in t.mapping.layers:
        n[p.binding] = n.get(p.binding, 0) + p.cores
    return ", ".join(f"{k}: {v:,} cores" for k, v in sorted(n.items(), key=lambda kv: -kv[1])) or DASH


def _baseline(e: Estimate) -> str | None:
    """The ANN baseline ``snn_over_int8_ann`` divided by (the estimate does not name it)."""
    a, r = e.ann, e.snn_over_int8_ann
    if not r or not e.energy_j:
        return None
    base = e.energy_j / r
    cands = {k: v for k, v in (("int8_with_memory_j", a.int8_with_memory_j), ("int8_j", a.int8_j)) if v}
    return min(cands, key=lambda k: abs(cands[k] - base)) if cands else None


def _unpriced(e: Estimate) -> list[str]:
    counts = {t.term: t.count for t in e.energy_terms}
    return [f"{u} ({count(counts.get(u))})" for u in e.unpriced]


def _verdict(e: Estimate) -> str:
    r = e.snn_over_int8_ann
    if r is None:
        return "no int8 ANN price on this target: no comparison"
    base = {"int8_with_memory_j": "int8 ANN with weight-memory reads", "int8_j": "int8 ANN, arithmetic only"}
    s = (f"SNN / int8 ANN = {ratio(r)} (against the {base.get(_baseline(e) or '', 'int8 ANN')}). Below 1 means the SNN "
         f"beats a quantised ANN on this table; here {'the SNN wins' if r < 1 else 'the int8 ANN wins'}.")
    if e.unpriced:
        s += " Unpriced terms are left out, so the SNN figure is a lower bound."
    return s


def _host_groups(hw: list[dict]) -> list[list[str]]:
    """Host work summed per op. No grand total: the units differ (MACs, elements, neurons encoded)."""
    g: dict[str, dict] = {}
    for h in hw:
        d = g.setdefault(h["op"], {"n": 0, "ops": 0.0, "stages": [], "why": [], "fed": []})
        d["n"] += 1
        d["ops"] += h["ops"] or 0.0
        d["stages"].append(h["stage"])
        fed = re.match(r"SFN fed by host op (\S+): (.*)", h["why"] or "")
        if fed and fed.group(1) not in d["fed"]:
            d["fed"].append(fed.group(1))
            d["tail"] = fed.group(2)
        elif not fed and h["why"] not in d["why"]:
            d["why"].append(h["why"])
    units = {h["op"]: h.get("unit", "elements") for h in hw}
    rows = []
    for op, d in g.items():
        why = d["why"] + ([f"SFN fed by host op {' / '.join(d['fed'])}: {d['tail']}"] if d["fed"] else [])
        rows.append([op, str(d["n"]), count(d["ops"]), units[op], _span(d["stages"]), "; ".join(why)])
    return rows


# ---------------------------------------------------------------- blocks
# ("h", level, text) ("p", text) ("callout", [lines]) ("table", headers, rows) ("plot", caption, base64 png)

def _fidelity_rows(r: Report) -> list[list[str]]:
    if r.fidelity == "output":
        parts = f" (per output: {', '.join(f'{v:.4f}' for v in r.cosine_parts)})" if r.cosine_parts else ""
        return [["Output fidelity", f"cosine similarity {r.cosine:.4f}{parts}, relative error "
                                    f"{r.relative_error:.2f} % (SNN outputs against the ANN's)"]]
    return [["Accuracy", f"SNN {pct(r.accuracy)} vs ANN {pct(r.ann_accuracy)}"],
            ["Agreement SNN/ANN (top-1)", pct(r.agreement)]]


def _header(r: Report, level: int) -> list:
    src = r.source or {}
    source = src.get("spec", DASH) + (f" (sha256 {src['sha256'][:12]}…)" if src.get("sha256") else "")
    rows = [["Model", r.model or DASH], ["Source", source],
            ["Samples", f"{r.samples:,} (every count is per inference, averaged over them)"],
            ["Levels M", _list(r.levels_M)], ["Fire function", _list(r.fire)], ["λ", _lam(r.lam)],
            *_fidelity_rows(r)]
    if r.drop is not None:
        rows.append(["Drop ANN − SNN", format_drop(r.drop)])
    by = r.energy_ratio_by_convention or {}
    callout = [f"Energy ratio SNN / ANN (the paper's eq. 43, 45 nm CMOS prices): {ratio(r.energy_ratio)}",
               f"eq. 44 approximation (first layer's MACs dropped): {ratio(r.energy_ratio_approx)} · "
               "by convention: " + ", ".join(f"{c} {ratio(v)}" for c, v in by.items()),
               CONVENTION_NOTE]
    return [("h", level, f"SFN hardware report: {r.model or 'model'}"), ("table", ["", ""], rows),
            ("callout", callout)]


def _planning(r: Report, plots: bool) -> list:
    """The targets ranked: what a planner choosing a chip reads first."""
    rows = []
    for p in r.planning or []:
        t = r.targets[p.target]
        e = t.estimate
        rows.append([str(p.rank), p.target, p.runs,
                     banded(energy(p.energy_j), p.energy_band) + (" PROXY" if p.proxy else ""),
                     banded(seconds(p.latency_s), p.latency_band) if p.latency_s is not None else "not timed",
                     f"{count(p.throughput_per_s)}/s" if p.throughput_per_s else DASH,
                     count(p.chips) if p.chips is not None else DASH,
                     "yes" if p.fits else f"NO ({p.violations})", ratio(e.snn_over_int8_ann), _list(p.unpriced)])
    out: list = [("h", 2, "Planning view: targets ranked"),
                 ("p", "Targets that fit come first, then lower energy per inference. SNN rows run the converted "
                       "network; ANN rows are dense engines running the source ANN (the baseline a planner "
                       "compares against). In brackets: measured ÷ predicted over the target's back-tests "
                       "(docs/validation.md). PROXY: some figures are another chip's. Unpriced terms are left "
                       "out, so such an energy is a lower bound."),
                 ("table", ["#", "target", "runs", "energy / inference", "latency", "throughput", "chips", "fits",
                            "SNN / int8 ANN", "not priced"], rows)]
    if plots:
        p = _plot_planning(r)
        if p:
            out.append(("plot", *p))
    return out


def _overview(r: Report) -> list:
    rows = []
    for name, t in r.targets.items():
        e, m = t.estimate, t.mapping
        cores = _has_cores(t)
        proxy = " (PROXY prices)" if e.proxy_figures else ""
        bands = e.bands or {}
        rows.append([name, e.convention, banded(energy(e.energy_j), bands.get("energy")) + proxy,
                     _list(e.unpriced),
                     banded(seconds(e.latency_s), bands.get("latency")) if e.latency_s is not None else "not timed",
                     f"{count(e.throughput_per_s)}/s" if e.throughput_per_s else DASH,
                     count(m.cores) if cores else DASH, count(m.chips) if cores else DASH,
                     "yes" if m.fits else f"NO ({len(m.violations)})", ratio(e.snn_over_int8_ann)])
    return [("table", ["target", "convention", "energy / inference", "not priced", "latency", "throughput", "cores",
                       "chips", "fits", "SNN / int8 ANN"], rows)]


def _totals(r: Report) -> list:
    rows = [[f"synaptic ops, {c} convention", count(v)] for c, v in (r.synops or {}).items()]
    rows += [["MACs, SNN (layers with analog input)", count(r.mac_snn)], ["MACs, source ANN", count(r.mac_ann)],
             ["host operations", count(r.host_ops)]]
    rows += [[f"  host: {op}", count(v)] for op, v in (r.host_ops_by_op or {}).items()]
    rows += [["neuron updates (SFN neurons)", count(r.neuron_updates)], ["spikes Σ|y|", count(r.spikes)]]
    out: list[tuple] = [("table", ["per inference", "count"], rows)]
    cd = r.channel_decomposition
    if cd:
        out.append(("p", f"Binary threshold channels (Loihi 1, NIR) instead of graded spikes: SFN neurons "
                         f"{count(cd.neurons_graded)} → {count(cd.neurons_channels)}, synapses "
                         f"{count(cd.synapses_graded)} → {count(cd.synapses_channels)} (one neuron per "
                         f"channel, one synapse per incoming channel)."))
    lv = r.lava
    if lv and "error" not in lv:
        kinds = ", ".join(f"{v} {k}" for k, v in sorted(lv["by_kind"].items()) if k != "host")
        out.append(("p", f"Lava target (graded spikes): {lv['processes']} processes, {lv['neuro_core_processes']} on "
                         f"neuro-cores ({kinds}) and {lv['host_processes']} on the host (input encoding, output "
                         f"decoding{', ' + ', '.join(lv['host_ops']) if lv['host_ops'] else ''}); latency "
                         f"{lv['latency_steps']} timesteps from a sample entering to its output."))
    elif lv:
        out.append(("p", f"Lava target: not expressible ({lv['error']})."))
    return out


def _mapping(t: TargetPlan, level: int) -> list:
    """The mapping summary, the layer table, the violations and the host work of one target."""
    m = t.mapping
    cores = _has_cores(t)
    summary = [["fits", "yes" if m.fits else f"NO: {len(m.violations)} violation(s)"],
               ["cores", count(m.cores) if cores else DASH + " (no core model)"],
               ["chips", f"{count(m.chips)} (bound by {m.chip_binding or DASH})" if cores else DASH],
               ["cores set by", _bindings(t) if cores else DASH],
               ["compartments", count(m.compartments)], ["stored synapses", count(m.synapses)],
               ["not checked", _list(m.unchecked)]]
    out: list = [("h", level + 1, "Mapping"), ("table", ["", ""], summary)]
    rows = [[p.name, p.op, count(p.units), count(p.compartments), count(p.synapses),
             count(p.axons_per_core) if cores else DASH, count(p.cores) if cores else DASH,
             p.binding if cores else DASH, p.output] for p in m.layers]
    out.append(("table", ["layer", "op", "units", "compartments", "synapses", "axons/core", "cores", "binding",
                          "output"], rows))
    out.append(("h", level + 1, "Violations"))
    if m.violations:
        out.append(("table", ["layer", "rule", "limit", "value", "fix"],
                    [[v.layer, v.rule, count(v.limit), count(v.value), v.fix] for v in m.violations]))
    else:
        out.append(("p", "fits: no checked limit is violated" +
                    (f" (not checked: {_list(m.unchecked)})" if m.unchecked else "") + "."))
    if m.host_work:
        out += [("h", level + 1, "Host work (not on the neuro cores)"),
                ("table", ["op", "layers", "work / inference", "unit", "stages", "why"], _host_groups(m.host_work))]
    return out


def _avg_pool_line(e: Estimate) -> str | None:
    """Both forms of average pooling on a graded target and the one priced in the total."""
    a = e.avg_pool
    if a is None:
        return None
    f, lay = a["folded"], a["layer"]
    if "total_j" not in f:                       # priced in one form only (estimate() without plan_target)
        return (f"Average pooling ({', '.join(a['poolings'])}): folded {count(f['synops'])} synops "
                f"({energy(f['energy_j'])}); as pooling layers {count(lay['synops'])} synops and "
                f"{count(lay['neurons'])} neurons ({energy(lay['energy_j'])}); {a['priced']} priced.")
    why = (f"; as layers it would break {', '.join(lay['breaks'])}" if lay.get("breaks") else
           "; both forms fit" if f["fits"] and lay["fits"] else "")
    return (f"Average pooling ({', '.join(a['poolings'])}): folded into the next weights {count(f['synops'])} "
            f"synops ({energy(f['energy_j'])}), total {energy(f['total_j'])}, latency {seconds(f['latency_s'])}, "
            f"{count(f['cores'])} cores; as pooling layers {count(lay['synops'])} synops and "
            f"{count(lay['neurons'])} neurons, {count(lay['active'])} firing ({energy(lay['energy_j'])}), total "
            f"{energy(lay['total_j'])}, latency {seconds(lay['latency_s'])}, {count(lay['cores'])} cores{why}: "
            f"{a['chosen']} is kept, in the mapping and the totals (sfn-deploy export --target lava --avg-pool "
            f"{a['chosen']}).")


def _energy(e: Estimate, level: int) -> list:
    """The energy terms of one target and the totals under them."""
    out: list = [("h", level + 1, "Energy per inference")]
    rows = []
    for term in e.energy_terms:
        proxy = term.evidence == "proxy"
        cnt = seconds(term.count) if term.price == "chip.static_w" else count(term.count)
        rows.append([term.term, term.what, cnt, term.price or DASH,
                     ratio(term.pj_each), energy(term.joules) if term.priced else "not priced",
                     ("yes, PROXY" if proxy else "yes") if term.priced else "no", term.source or DASH])
    out.append(("table", ["term", "what", "count", "price", "pJ each", "energy", "priced", "source"], rows))
    lines = [f"Energy per inference: {energy(e.energy_j)} (dynamic {energy(e.energy_dynamic_j)}, static "
             f"{energy(e.energy_static_j) if e.energy_static_j is not None else 'not priced'}); "
             f"without weight memory: {energy(e.energy_without_memory_j)}."]
    band = (e.bands or {}).get("energy")
    lines.append(f"Back-tests: measured energy lay within {band['text']} of this target's estimate "
                 f"({band['source']})." if band else
                 "Back-tests: none for this target yet; the figure is not validated against a measurement.")
    if e.included:
        lines.append("Included in the all-in price (not priced separately): " + ", ".join(e.included) + ".")
    if e.unpriced:
        lines.append("Not priced (not in the total): " + ", ".join(_unpriced(e)) + ".")
    if e.proxy_figures:
        lines.append("PROXY prices (another chip's figures, no published one for this target): "
                     + ", ".join(e.proxy_figures) + ". Treat the total as indicative.")
    pool = _avg_pool_line(e)
    if pool:
        lines.append(pool)
    return out + [("p", s) for s in lines]


def _target(name: str, t: TargetPlan, level: int) -> list:
    e = t.estimate
    out: list = [("h", level, f"Target {name}"), ("p", t.description or ""),
                 ("p", f"Spikes: {t.spikes}; synaptic ops under the {e.convention} convention.")]
    out += _mapping(t, level) + _energy(e, level)

    out.append(("h", level + 1, "Latency"))
    if e.latency_s is not None:
        s = (f"Single inference: {seconds(e.latency_s)} (sum of {len(e.stages)} pipeline stages and their "
             f"barriers). Streaming: one inference per step of {seconds(e.step_s)}, "
             f"throughput {count(e.throughput_per_s)} inferences/s.")
        if e.untimed:
            s += f" Not timed: {_list(e.untimed)}."
        band = (e.bands or {}).get("latency")
        s += (f" Back-tests: measured latency lay within {band['text']} of the estimate." if band
              else " Not back-tested.")
        out.append(("p", s))
    else:
        out.append(("p", "not timed (the target has no core model or no [time_ns] figures)."))
    tr = e.traffic
    out.append(("p", f"Pipeline depth: {e.pipeline_steps} timesteps per inference. Traffic per "
                     f"inference: {count(tr.synaptic_reads)} synaptic-memory reads "
                     f"({count(tr.synaptic_read_bits)} bits), {count(tr.message_bits)} spike payload bits "
                     f"({tr.note})."))

    a = e.ann
    out.append(("h", level + 1, "ANN baselines (source ANN's MACs on the same table)"))
    rows = []
    if a.target_j is not None:
        rows.append([a.target_label or "ANN at the target's MAC price", energy(a.target_j)])
    if a.target_with_memory_j is not None:
        rows.append(["… with weight memory", energy(a.target_with_memory_j)])
    rows += [["ANN int8", energy(a.int8_j) if a.int8_j is not None else "not priced"],
             ["ANN int8 with weight memory",
              energy(a.int8_with_memory_j) if a.int8_with_memory_j is not None else "not priced"],
             [f"SNN on {name}", energy(e.energy_j)]]
    out += [("table", ["", "energy / inference"], rows), ("p", _verdict(e))]
    if a.int8_source:
        out.append(("p", f"int8 price: {a.int8_source}"))
    return out


def _layers(r: Report, level: int) -> list:
    rows = [[d["name"], d["op"], str(d.get("stage", "")), d.get("input") or DASH, count(d.get("mac_ann")),
             count(d.get("ac")), count(d.get("ac_event")), count(d.get("ac_channel")), count(d.get("mac")),
             count(d.get("host_ops")), count(d.get("neurons")),
             f"{100 * d['firing_rate']:.1f} %" if d["op"] in NEURON_OPS else DASH] for d in r.layers]
    out: list[tuple] = [("h", level, "Operations per layer (per inference)"),
           ("table", ["layer", "op", "stage", "input", "MAC ANN", "AC spike", "AC event", "AC channel", "MAC",
                      "host ops", "neurons", "firing rate"], rows)]
    timed = {n: {s.stage: s.ns for s in t.estimate.stages} for n, t in r.targets.items() if t.estimate.stages}
    rows = []
    for s in r.stages:
        names = s["layers"]
        shown = ", ".join(names[:4]) + (f" +{len(names) - 4}" if len(names) > 4 else "")
        rows.append([str(s["stage"]), shown, count(s["synops"]), count(s["mac"]), count(s["host_ops"]),
                     count(s["neuron_updates"])]
                    + [seconds(tm[s["stage"]] * 1e-9) if s["stage"] in tm else DASH for tm in timed.values()])
    out += [("h", level, "Per timestep (pipeline stage)"),
            ("p", "What one inference does at each step of the stream (synaptic ops under the spike convention); "
                  "time columns are each timed target's slowest layer in that stage, barrier excluded."),
            ("table", ["stage", "layers", "synops", "MAC", "host ops", "neuron updates"]
             + [f"time {n}" for n in timed], rows)]
    return out


def _report_blocks(r: Report, level: int, plots: bool) -> list:
    head = _header(r, level)
    if r.planning and level == 1:           # the page opens on the ranking
        out = head[:1] + _planning(r, plots) + head[1:]
    else:
        out = head + [("h", level + 1, "Targets at a glance")] + _overview(r)
    out += [("h", level + 1, "Totals")] + _totals(r)
    if plots:
        out += [("h", level + 1, "Plots")] + _plots(r)
    for name, t in r.targets.items():
        out += _target(name, t, level + 1)
    return out + _layers(r, level + 1)


def _comparison_blocks(doc: Comparison, plots: bool) -> list:
    rows = doc.comparison
    targets = list(dict.fromkeys(k for row in rows for k, v in row.items()
                                 if isinstance(v, dict) and "energy_j" in v))
    head = ["model", "method", "T", "M", "λ", "accuracy", "ANN accuracy", "energy ratio (eq. 43)"]
    for t in targets:
        head += [f"{t} energy", f"{t} latency", f"{t} cores", f"{t} chips", f"{t} fits", f"{t} SNN/int8"]
    table = []
    for row in rows:
        cells = [row["model"], row.get("method", "sfn"), str(row.get("timesteps", 1)), _list(row["M"]),
                 _lam(row["lam"]), pct(row["accuracy"]), pct(row["ann_accuracy"]), ratio(row["energy_ratio"])]
        for t in targets:
            x = row.get(t)
            if x is None:
                cells += [DASH] * 6
                continue
            cells += [energy(x["energy_j"]), seconds(x["latency_s"]) if x["latency_s"] is not None else "not timed",
                      count(x["cores"]) if x["cores"] else DASH, count(x["chips"]) if x["chips"] else DASH,
                      "yes" if x["fits"] else "NO", ratio(x["snn_over_int8_ann"])]
        table.append(cells)
    out = [("h", 1, f"SFN hardware comparison: {len(rows)} variants"),
           ("p", "Energy and latency are per inference; SNN/int8 below 1 means the SNN beats a quantised ANN on "
                 "that target's table. " + CONVENTION_NOTE),
           ("table", head, table)]
    for r in doc.reports:
        out += _report_blocks(r, 2, plots)
    return out


def _blocks(doc: Report | Comparison, plots: bool) -> list:
    if isinstance(doc, Comparison):
        return _comparison_blocks(doc, plots)
    if isinstance(doc, Report):
        return _report_blocks(doc, 1, plots)
    raise ValueError(f"not a report nor a comparison: {type(doc).__name__}")


# ---------------------------------------------------------------- plots

def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=72, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _top(items: list[_T], key, n: int = TOP) -> list[_T]:
    """The n largest by key, in their original (network) order."""
    if len(items) <= n:
        return items
    keep = {id(d) for d in sorted(items, key=key, reverse=True)[:n]}
    return [d for d in items if id(d) in keep]


def _hbars(fig, names: list[str], series: list[tuple[str, list]], xlabel: str, title: str) -> None:
    ax = fig.add_subplot()
    k = len(series)
    h = 0.8 / k
    for i, (label, vals) in enumerate(series):
        ys = [j - 0.4 + h * (i + 0.5) for j in range(len(names))]
        ax.barh(ys, [v if v else float("nan") for v in vals], height=h, label=label)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    low = min((v for _, vals in series for v in vals if v), default=None)
    if low:
        ax.set_xlim(left=low / 3)            # bars start at the axis: keep the smallest one visible
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    ax.grid(axis="x", alpha=0.3)


def _plot_ops(r: Report):
    from matplotlib.figure import Figure
    rows = [d for d in r.layers if d["op"] not in NEURON_OPS and (d.get("mac_ann") or d.get("host_ops"))]
    if not rows:
        return None
    shown = _top(rows, lambda d: max(d.get("mac_ann", 0), d.get("ac", 0), d.get("host_ops", 0)))
    series = [(label, [d.get(k, 0.0) for d in shown]) for label, k in
              (("synops, spike", "ac"), ("synops, event", "ac_event"), ("synops, channel", "ac_channel"),
               ("MAC (SNN)", "mac"), ("MAC (source ANN)", "mac_ann"), ("host ops", "host_ops"))]
    fig = Figure(figsize=(7.5, 1.2 + 0.32 * len(shown)))
    more = f" (largest {len(shown)} of {len(rows)})" if len(shown) < len(rows) else ""
    _hbars(fig, [d["name"] for d in shown], series, "operations per inference (log)", "Operations per layer" + more)
    return "Operations per layer by kind: synaptic ops under each convention, MACs and host operations" + more, \
        _png(fig)


def _plot_energy(r: Report):
    from matplotlib.figure import Figure
    targets = [(n, [x for x in t.estimate.energy_terms if x.priced and x.joules])
               for n, t in r.targets.items()]
    targets = [(n, ts) for n, ts in targets if ts]
    if not targets:
        return None
    terms = list(dict.fromkeys(x.term for _, ts in targets for x in ts))
    peak = max(sum(x.joules or 0.0 for x in ts) for _, ts in targets)
    scale, prefix = next(((f, p) for f, p in _PREFIXES if peak >= f * 0.99995), _PREFIXES[-1])
    fig = Figure(figsize=(7.5, 1.4 + 0.45 * len(targets)))
    ax = fig.add_subplot()
    left = [0.0] * len(targets)
    for term in terms:
        vals = [sum(x.joules or 0.0 for x in ts if x.term == term) / scale for _, ts in targets]
        ax.barh(range(len(targets)), vals, left=left, label=term)
        left = [a + b for a, b in zip(left, vals, strict=True)]
    for i, (n, _) in enumerate(targets):
        e = r.targets[n].estimate
        note = " + unpriced" if e.unpriced else ""
        ax.text(left[i], i, f" {energy(e.energy_j)}{note}", va="center", fontsize=7)
    ax.set_yticks(range(len(targets)), [n for n, _ in targets], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, max(left) * 1.35)
    ax.set_xlabel(f"energy per inference ({prefix}J)")
    ax.set_title("Energy per inference by priced term", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    return "Energy breakdown per target (priced terms only; unpriced terms are listed in each target's table)", \
        _png(fig)


def _plot_planning(r: Report):
    """Energy and latency per inference of every target, ranked, with each target's band as whiskers."""
    from matplotlib.figure import Figure
    rows = list(r.planning or [])
    if not rows:
        return None
    fig = Figure(figsize=(9, 1.2 + 0.32 * len(rows)))
    axes = fig.subplots(1, 2, sharey=True)
    names = [f"{p.rank}. {p.target}" + (" (ANN)" if p.runs == "ANN" else "") for p in rows]
    for ax, key, band, label in ((axes[0], "energy_j", "energy_band", "energy per inference, J (log)"),
                                 (axes[1], "latency_s", "latency_band", "latency per inference, s (log)")):
        for i, p in enumerate(rows):
            v = getattr(p, key)
            if not v:
                ax.text(0.01, i, "not timed", va="center", fontsize=7, transform=ax.get_yaxis_transform())
                continue
            colour = "#2ca02c" if p.fits else "#999999"
            ax.barh(i, v, color=colour, hatch="//" if p.runs == "ANN" else None, edgecolor="white")
            b = getattr(p, band)
            if b:
                ax.errorbar(v, i, xerr=[[v - v * b["low"]], [v * b["high"] - v]], fmt="none", ecolor="black",
                            capsize=3, lw=1)
        ax.set_xscale("log")
        ax.set_xlabel(label, fontsize=8)
    axes[0].set_yticks(range(len(rows)), names, fontsize=8)
    axes[0].invert_yaxis()
    fig.suptitle("Targets ranked (green: fits, grey: does not fit; hatched: dense ANN baseline; whiskers: "
                 "back-test band)", fontsize=9)
    return ("Energy and latency per inference on every target, in rank order. Whiskers span measured ÷ predicted "
            "over the target's back-tests; a bar without whiskers is not back-tested."), _png(fig)


def _plot_sites(r: Report):
    from matplotlib.colors import LogNorm
    from matplotlib.figure import Figure
    sites = [d for d in r.layers if d["op"] in NEURON_OPS and d.get("neurons")]
    if not sites:
        return None
    shown = _top(sites, lambda d: d.get("spikes", 0.0), TOP_SITES)
    levels = sorted({float(k) for d in shown for k in (d.get("level_hist") or {})})
    fig = Figure(figsize=(8, 1.4 + 0.24 * len(shown)))
    ax1, ax2 = fig.subplots(1, 2, sharey=True, gridspec_kw={"width_ratios": [1, 2]})
    ax1.barh(range(len(shown)), [100 * d["firing_rate"] for d in shown], color="tab:orange")
    ax1.set_yticks(range(len(shown)), [d["name"] for d in shown], fontsize=7)
    ax1.invert_yaxis()
    ax1.set_xlabel("firing rate (% neurons, y ≠ 0)")
    if levels:
        col = {v: i for i, v in enumerate(levels)}
        grid = [[float("nan")] * len(levels) for _ in shown]
        for i, d in enumerate(shown):
            for k, c in (d.get("level_hist") or {}).items():
                if c:
                    grid[i][col[float(k)]] = c / d["neurons"]
        im = ax2.imshow(grid, aspect="auto", cmap="viridis", norm=LogNorm(vmin=1e-5, vmax=1), interpolation="nearest")
        step = max(1, len(levels) // 20)
        ax2.set_xticks(range(0, len(levels), step), [f"{levels[i]:g}" for i in range(0, len(levels), step)],
                       fontsize=7, rotation=90)
        ax2.set_xlabel("spike level y")
        fig.colorbar(im, ax=ax2, label="fraction of neurons")
    more = f" (most active {len(shown)} of {len(sites)})" if len(shown) < len(sites) else ""
    fig.suptitle("SFN sites: firing rate and level histogram" + more, fontsize=9)
    return "Firing rate per SFN site and the distribution of its signed spike levels per inference" + more, _png(fig)


def _plot_ann_snn(r: Report):
    from matplotlib.figure import Figure
    pick = None
    for key in ("ann_target_j", "ann_int8_j"):
        pick = next(((n, t) for n, t in r.targets.items()
                     if any(getattr(x, key) is not None for x in t.estimate.layers)), None)
        if pick:
            break
    if pick is None:
        return None
    name, t = pick
    order = {d["name"]: i for i, d in enumerate(r.layers)}     # the estimate lists weights, then products
    layers = sorted(t.estimate.layers, key=lambda d: order.get(d.name, len(order)))
    rows = _top(layers, lambda d: max(d.ann_target_j or 0, d.ann_int8_j or 0, d.snn_j or 0))
    series = [(label, [getattr(d, k) or 0.0 for d in rows]) for label, k in
              ((f"SNN ({name})", "snn_j"), (f"ANN ({name} MAC price)", "ann_target_j"), ("ANN int8", "ann_int8_j"))]
    series = [s for s in series if any(s[1])]
    fig = Figure(figsize=(7.5, 1.2 + 0.3 * len(rows)))
    total = len(t.estimate.layers)
    more = f" (largest {len(rows)} of {total})" if len(rows) < total else ""
    _hbars(fig, [d.name for d in rows], series, "energy per inference, J (log)",
           f"Energy per layer on {name}" + more)
    return (f"ANN vs SNN energy per layer on {name}: arithmetic only (synaptic ops and MACs; no weight memory, "
            f"neuron updates or static power)" + more), _png(fig)


def _plots(r: Report) -> list:
    out = []
    for make in (_plot_ops, _plot_energy, _plot_sites, _plot_ann_snn):
        p = make(r)
        if p:
            out.append(("plot", *p))
    return out


# ---------------------------------------------------------------- writers

def _md_cell(s: str) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def to_markdown(doc: Report | Comparison) -> str:
    """The report or comparison as Markdown (tables, no plots: those are in the HTML page)."""
    lines: list[str] = []
    for b in _blocks(doc, plots=False):
        if b[0] == "h":
            lines += ["#" * min(b[1], 6) + " " + b[2], ""]
        elif b[0] == "p":
            if b[1]:
                lines += [b[1], ""]
        elif b[0] == "callout":
            lines += [f"> **{b[1][0]}**  "] + [f"> {x}  " for x in b[1][1:]] + [""]
        elif b[0] == "table":
            head, rows = b[1], b[2]
            if not rows:
                continue
            lines.append("| " + " | ".join(_md_cell(h) or " " for h in head) + " |")
            lines.append("|" + "|".join("---" for _ in head) + "|")
            lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"


_STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;max-width:1200px;margin:1.5em auto;padding:0 1em;
color:#222;line-height:1.4}
table{border-collapse:collapse;margin:.6em 0 1.2em;font-size:13px}
th,td{border:1px solid #ccc;padding:3px 7px;vertical-align:top}
th{background:#f0f0f0;text-align:left}
td.n{text-align:right;white-space:nowrap;font-variant-numeric:tabular-nums}
tr:nth-child(even) td{background:#fafafa}
.callout{border-left:5px solid #1f77b4;background:#eef5fb;padding:.6em 1em;margin:1em 0}
.callout .big{font-size:1.35em;font-weight:600}
figure{margin:1em 0}figcaption{font-size:12px;color:#555}
img{max-width:100%}
h1{border-bottom:2px solid #ddd}h2{border-bottom:1px solid #eee;margin-top:1.6em}
"""
_NUMERIC = re.compile(r"^(?:[−\-]?[\d.,]+(?:e[+-]?\d+)?(?: ?[a-zA-Zµ%/]+)?|—.*|not priced|not timed)$")


def to_html(doc: Report | Comparison) -> str:
    """The report or comparison as one self-contained HTML page: inline style, plots as base64 PNG."""
    e = html.escape
    title = (f"SFN comparison ({len(doc.comparison)} variants)" if isinstance(doc, Comparison)
             else f"SFN report: {doc.model or 'model'}")
    body: list[str] = []
    for b in _blocks(doc, plots=True):
        if b[0] == "h":
            lv = min(b[1], 6)
            body.append(f"<h{lv}>{e(b[2])}</h{lv}>")
        elif b[0] == "p":
            if b[1]:
                body.append(f"<p>{e(b[1])}</p>")
        elif b[0] == "callout":
            body.append('<div class="callout"><div class="big">' + e(b[1][0]) + "</div>"
                        + "".join(f"<div>{e(x)}</div>" for x in b[1][1:]) + "</div>")
        elif b[0] == "table":
            head, rows = b[1], b[2]
            if not rows:
                continue
            out = ["<table>"]
            if any(head):
                out.append("<tr>" + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr>")
            for row in rows:
                out.append("<tr>" + "".join(
                    f'<td class="n">{e(c)}</td>' if i and _NUMERIC.match(str(c)) else f"<td>{e(str(c))}</td>"
                    for i, c in enumerate(row)) + "</tr>")
            body.append("\n".join(out + ["</table>"]))
        elif b[0] == "plot":
            body.append(f'<figure><img alt="{e(b[1])}" src="data:image/png;base64,{b[2]}">'
                        f"<figcaption>{e(b[1])}</figcaption></figure>")
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{e(title)}</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n"
            + "\n".join(body) + "\n</body>\n</html>\n")


def _text_report(r: Report) -> list[str]:
    by = r.energy_ratio_by_convention or {}
    scored = (f"cosine similarity {r.cosine:.4f} (relative error {r.relative_error:.2f} %)"
              if r.fidelity == "output" else
              f"accuracy {pct(r.accuracy)} (ANN {pct(r.ann_accuracy)}, agreement {pct(r.agreement)})")
    lines = [f"{r.model or 'model'}: {r.samples:,} samples, {scored}",
             *([format_drop(r.drop)] if r.drop is not None else []),
             f"energy ratio SNN/ANN (paper eq. 43): {ratio(r.energy_ratio)}; eq. 44: "
             f"{ratio(r.energy_ratio_approx)}; by convention: "
             + ", ".join(f"{c} {ratio(v)}" for c, v in by.items())]
    if r.planning:
        lines.append("targets ranked (fits first, then energy; in brackets measured ÷ predicted over back-tests):")
        for p in r.planning:
            lat = banded(seconds(p.latency_s), p.latency_band) if p.latency_s is not None else "not timed"
            chips = f", {count(p.chips)} chip(s)" if p.chips is not None else ""
            lower = f" + {len(p.unpriced)} unpriced" if p.unpriced else ""
            lines.append(f"  {p.rank:>2}. {p.target} [{p.runs}]: {banded(energy(p.energy_j) + lower, p.energy_band)}"
                         f"{' PROXY' if p.proxy else ''}, {lat}{chips}, "
                         f"{'fits' if p.fits else f'does NOT fit ({p.violations})'}")
    for name, t in r.targets.items():
        e, m = t.estimate, t.mapping
        fit = "fits" if m.fits else f"does NOT fit: {len(m.violations)} violation(s)"
        if _has_cores(t):
            lines.append(f"{name} [{e.convention}]: {count(m.cores)} cores, {count(m.chips)} chip(s) "
                         f"(bound by {m.chip_binding}); cores set by {_bindings(t)}; {fit}")
        else:
            kind = "dense engine running the source ANN" if t.runs == "ann" else "no core model"
            lines.append(f"{name} [{e.convention}]: {kind}; {fit}")
        s = f"  energy {banded(energy(e.energy_j) + '/inference', (e.bands or {}).get('energy'))}"
        if e.energy_without_memory_j != e.energy_j:
            s += f" ({energy(e.energy_without_memory_j)} without weight memory)"
        if e.unpriced:
            s += "; not priced: " + ", ".join(e.unpriced)
        if e.proxy_figures:
            s += f"; {len(e.proxy_figures)} PROXY price(s)"
        lines.append(s)
        lines.append(f"  latency {seconds(e.latency_s)}, step {seconds(e.step_s)}, "
                     f"{count(e.throughput_per_s)} inferences/s" if e.latency_s is not None else "  not timed")
        r8 = e.snn_over_int8_ann
        if r8 is not None:
            lines.append(f"  SNN / int8 ANN {ratio(r8)} ({'SNN wins' if r8 < 1 else 'int8 ANN wins'})")
        if e.avg_pool is not None:
            a = e.avg_pool
            f, lay = a["folded"], a["layer"]
            lines.append(f"  average pooling: folded {energy(f.get('total_j', f['energy_j']))}, pooling layers "
                         f"{energy(lay.get('total_j', lay['energy_j']))}: {a.get('chosen', a['priced'])} kept"
                         + (f" (as layers: {', '.join(lay['breaks'])})" if lay.get("breaks") else ""))
        if m.violations:
            lines += [f"  violation: {v.layer}: {v.rule}: {count(v.value)} > limit {count(v.limit)}"
                      for v in m.violations[:5]]
            if len(m.violations) > 5:
                lines.append(f"  … {len(m.violations) - 5} more")
    return lines


def to_text(doc: Report | Comparison) -> str:
    """A short terminal summary: a few lines per target (the CLI prints it when no -o is given)."""
    if isinstance(doc, Report):
        return "\n".join(_text_report(doc))
    lines = []
    for row in doc.comparison:
        how = "" if row.get("method", "sfn") == "sfn" else f" [{row['method']}, T = {row.get('timesteps', 1)}]"
        parts = [f"{row['model']}{how}: accuracy {pct(row['accuracy'])} (ANN {pct(row['ann_accuracy'])}), "
                 f"ratio {ratio(row['energy_ratio'])}"]
        for k, x in row.items():
            if isinstance(x, dict) and "energy_j" in x:
                lat = seconds(x["latency_s"]) if x["latency_s"] is not None else "not timed"
                hw = f", {count(x['cores'])} cores" if x["cores"] else ""
                parts.append(f"{k} {energy(x['energy_j'])}, {lat}{hw}, {'fits' if x['fits'] else 'does NOT fit'}, "
                             f"SNN/int8 {ratio(x['snn_over_int8_ann'])}")
        lines.append(" | ".join(parts))
    return "\n".join(lines)
