"""Back-tests of `sfn-deploy report` against published measurements: docs/validation.md and each target's [band].

For every deployment in examples/backtests/published.toml (a network measured on a real chip, with sources):
rebuild the network (examples/backtests/networks.py), convert it at a fixed λ on seeded inputs whose
activity matches the paper where the paper reports one, price it on the matching target exactly as
`report` does, and put predicted beside measured. The ratio measured ÷ predicted of every back-test of a
target gives that target's band, printed beside each of its estimates.

    python examples/validation.py                 # print the table
    python examples/validation.py --write         # rewrite docs/validation.md, results.json and the targets' bands

tests/test_validation.py recomputes the predictions and fails when they drift from results.json, or when a
target's [band] no longer matches its back-tests.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

import tomli
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
PUBLISHED = os.path.join(HERE, "backtests", "published.toml")
RESULTS = os.path.join(HERE, "backtests", "results.json")
DOC = os.path.join(ROOT, "docs", "validation.md")
TARGETS = os.path.join(ROOT, "targets")
SAMPLES = 16        # seeded inputs per back-test: counts are averages per inference over them
LAM = 0.2           # fixed λ (no labels to search on): the value the README's examples land near
INTRO = """\
Each row is a network measured on a real chip, rebuilt here from the paper's description and priced by the same
code as `sfn-deploy report` on the matching target file. Measured ÷ predicted above 1 means the chip spent more
than the estimate. Rows marked "another chip" measured a different chip from the one the target models: they show
what the target leaves out and are not counted in its band. The inputs are seeded random data (uniform in [0, 1),
with the paper's activity where it reports one) and the weights are seeded random. A deployment whose timesteps
per inference the source gives is priced the way it ran (binary IF spikes over those T steps, `method = "if"`);
the others as sfn-deploy's single-timestep conversion (λ fixed at 0.2, M = 8 levels), and where that differs from
the deployment's own spike code, the back-test's section says so.

Regenerate with `python examples/validation.py --write` (seconds). It rewrites this file,
`examples/backtests/results.json` and the `[band]` section at the end of each back-tested target file, which
`report` prints beside every energy and latency figure. The measurements with their sources and quotes are in
`examples/backtests/published.toml`; the networks in `examples/backtests/networks.py`."""
BAND_MARK = "# [band] written by examples/validation.py from docs/validation.md: do not edit by hand"


def published() -> list[dict]:
    with open(PUBLISHED, "rb") as f:
        return tomli.load(f)["backtest"]


def _inputs(shape: tuple, activity: float | None, seed: int = 0) -> torch.Tensor:
    """Uniform [0, 1) inputs; with a reported activity, that fraction of the entries is non-zero."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand((SAMPLES, *shape), generator=g)
    if activity is not None:
        x = x * (torch.rand(x.shape, generator=g) < activity)
    return x


def predict(entry: dict) -> dict:
    """Convert the rebuilt network and price it on the entry's target as `report` does."""
    from backtests.networks import BUILDERS

    from sfn_deploy.convert import convert
    from sfn_deploy.data import Dataset
    from sfn_deploy.simulators.counting import count_ops
    from sfn_deploy.simulators.estimate import estimate
    from sfn_deploy.targets import load_target
    from sfn_deploy.targets.mapping import map_network

    torch.manual_seed(0)
    built = BUILDERS[entry["id"]]()
    model, shape = built["model"], tuple(built["input_shape"])
    x = _inputs(shape, built.get("activity"))
    if x.dim() < 4:                     # sfn-deploy's data are N×C×H×W: a flat input gets unit axes
        model = torch.nn.Sequential(torch.nn.Flatten(), model).eval()
        x = x.reshape(SAMPLES, 1, 1, -1)
    data = Dataset(x, torch.zeros(SAMPLES, dtype=torch.long), entry["id"])
    # the input stays analog, as when the bands were measured (its layer is then reported unpriced)
    how = ({"method": entry["method"], "timesteps": entry["timesteps"]} if entry.get("method") else
           {"scale": LAM, "tune": False, "input_encoding": "analog"})
    converted = convert(model, data, quiet=True, **how)
    counts = count_ops(converted.graph, data.batches(SAMPLES))
    target = load_target(entry["target"])
    mapping = map_network(converted.graph, counts, target)
    e = estimate(converted.graph, counts, target, mapping)
    dynamic = entry.get("energy_scope", "").startswith("dynamic")
    return {"id": entry["id"], "target": target.name, "energy_j": e.energy_dynamic_j if dynamic else e.energy_j,
            "energy_figure": "dynamic" if dynamic else "total", "latency_s": e.latency_s,
            "throughput_per_s": e.throughput_per_s, "cores": e.cores, "chips": e.chips, "fits": mapping.fits,
            "unpriced": e.unpriced, "included": e.included or [], "synops": sum(
                c.synops(target.convention) for c in counts.layers if c.kind == "weight"),
            "mac_ann": counts.mac_ann}


def ratios(entry: dict, p: dict) -> dict:
    """measured ÷ predicted for energy and time (throughput enters as predicted ÷ measured: a time ratio)."""
    out = {}
    if entry.get("measured_energy_j") and p["energy_j"]:
        out["energy"] = entry["measured_energy_j"] / p["energy_j"]
    if entry.get("measured_latency_s") and p["latency_s"]:
        out["latency"] = entry["measured_latency_s"] / p["latency_s"]
    elif entry.get("measured_throughput_per_s") and p["throughput_per_s"]:
        out["latency"] = p["throughput_per_s"] / entry["measured_throughput_per_s"]
    return out


def bands(rows: list[dict]) -> dict[str, dict[str, dict]]:
    """Per target and figure: the span of measured ÷ predicted, always including ×1 (the estimate itself)."""
    out: dict[str, dict[str, dict]] = {}
    for r in rows:
        if not r["in_band"]:
            continue
        for key, v in r["ratios"].items():
            b = out.setdefault(r["target"], {}).setdefault(key, {"low": 1.0, "high": 1.0, "backtests": 0})
            b["low"], b["high"] = min(b["low"], v), max(b["high"], v)
            b["backtests"] += 1
    for per in out.values():
        for b in per.values():
            b["low"], b["high"] = _sig(b["low"], floor=True), _sig(b["high"], floor=False)
    return out


def _sig(v: float, floor: bool) -> float:
    """Two significant digits, rounded outwards so the band still contains every ratio."""
    k = 10 ** (math.floor(math.log10(v)) - 1)
    return (math.floor(v / k) if floor else math.ceil(v / k)) * k


def run() -> list[dict]:
    rows = []
    for entry in published():
        if not entry.get("target"):
            continue
        p = predict(entry)
        rows.append({**p, "ratios": ratios(entry, p), "in_band": entry.get("band", True)})
    return rows


def _band_block(per: dict[str, dict]) -> str:
    lines = [BAND_MARK, "[band]"]
    for key, b in sorted(per.items()):
        lines.append(f'{key} = {{ low = {b["low"]:g}, high = {b["high"]:g}, backtests = {b["backtests"]}, '
                     f'source = "docs/validation.md: measured ÷ predicted over {b["backtests"]} published '
                     f'deployment(s)" }}')
    return "\n".join(lines) + "\n"


def write_bands(all_bands: dict[str, dict[str, dict]]) -> None:
    """Replace (or append) the generated [band] block at the end of each shipped target file."""
    for f in sorted(os.listdir(TARGETS)):
        if not f.endswith(".toml"):
            continue
        path = os.path.join(TARGETS, f)
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
        text = text.split("\n" + BAND_MARK)[0].rstrip("\n") + "\n"
        per = all_bands.get(f[:-5])
        if per:
            text += "\n" + _band_block(per)
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(text)


def _x(v: float) -> str:
    return f"×{v:.3g}" if v < 1000 else f"×{v:,.0f}"


def _rate(v: float) -> str:
    return f"{v:.4g}/s" if v < 1000 else f"{v:,.0f}/s"


def _si(v: float | None, unit: str) -> str:
    from sfn_deploy.render import si
    return "—" if v is None else si(v, unit)


def markdown(rows: list[dict], entries: dict[str, dict], all_bands: dict) -> str:
    head = ["# Back-tests: `report` against published measurements", "",
            "<!-- generated by `python examples/validation.py --write`; tests/test_validation.py checks it -->", "",
            INTRO, "",
            "## Predicted against measured", "",
            "| back-test | target | energy measured | energy predicted | measured ÷ predicted | latency measured "
            "| latency predicted | measured ÷ predicted | fits | in band |", "|" + "---|" * 10]
    for r in rows:
        e = entries[r["id"]]
        lat_m = (_si(e["measured_latency_s"], "s") if e.get("measured_latency_s") else
                 _rate(e["measured_throughput_per_s"]) if e.get("measured_throughput_per_s") else "—")
        lat_p = (_si(r["latency_s"], "s") if e.get("measured_latency_s") or not r["throughput_per_s"] else
                 _rate(r["throughput_per_s"]))
        scope = e.get("energy_scope", "").split()[0].rstrip(":,")
        head.append(f"| {r['id']} | {r['target']} | {_si(e.get('measured_energy_j'), 'J')} ({scope}) "
                    f"| {_si(r['energy_j'], 'J')} ({r['energy_figure']}) | "
                    f"{_x(r['ratios']['energy']) if 'energy' in r['ratios'] else '—'} | {lat_m} | {lat_p} | "
                    f"{_x(r['ratios']['latency']) if 'latency' in r['ratios'] else '—'} | "
                    f"{'yes' if r['fits'] else 'NO'} | {'yes' if r['in_band'] else 'no: another chip'} |")
    head += ["", "## Bands per target", "",
             "What `report` prints beside each figure: the span of measured ÷ predicted over the target's "
             "back-tests, always including ×1.", "", "| target | energy band | latency band |", "|---|---|---|"]
    for t, per in sorted(all_bands.items()):
        cells = [f"×{per[k]['low']:g}–×{per[k]['high']:g} ({per[k]['backtests']})" if k in per else "—"
                 for k in ("energy", "latency")]
        head.append(f"| {t} | {cells[0]} | {cells[1]} |")
    head += ["", "## Each back-test: what the estimate leaves out, and sources", ""]
    for r in rows:
        e = entries[r["id"]]
        head += [f"### {r['id']}", "", f"**{e['title']}** — {e['citation']} <{e['url']}>", "",
                 f"- Network: {e['network']}",
                 f"- Measured energy scope: {e.get('energy_scope', '—')}",
                 f"- Measured time scope: {e.get('latency_scope', '—')}",
                 f"- Activity: {e.get('activity', '—')}",
                 f"- Predicted on `{r['target']}`: {r['synops']:,.0f} synaptic ops, {r['mac_ann']:,.0f} ANN MACs per "
                 f"inference; {r['cores']} cores, {r['chips']} chip(s); not priced: "
                 f"{', '.join(r['unpriced']) or 'nothing'}.",
                 f"- Discrepancy explained: {e.get('explained', 'not yet analysed')}",
                 f"- Notes: {e.get('notes', '')}", "", "Quotes:", ""]
        head += [f"> {q}" + "  " for q in e.get("quotes", [])] + [""]
    return "\n".join(head).rstrip() + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true", help="rewrite docs/validation.md, results.json and the bands")
    args = ap.parse_args()
    rows = run()
    all_bands = bands(rows)
    for r in rows:
        print(f"{r['id']:<40} {r['target']:<12} " + ", ".join(f"{k} {_x(v)}" for k, v in r["ratios"].items()))
    if args.write:
        entries = {e["id"]: e for e in published()}
        with open(RESULTS, "w", encoding="utf-8") as f:
            json.dump({"samples": SAMPLES, "lam": LAM, "rows": rows, "bands": all_bands}, f, indent=1)
            f.write("\n")
        with open(DOC, "w", encoding="utf-8") as f:
            f.write(markdown(rows, entries, all_bands))
        write_bands(all_bands)
        print(f"wrote {os.path.relpath(DOC, ROOT)}, {os.path.relpath(RESULTS, ROOT)} and the targets' [band]")


if __name__ == "__main__":
    main()
