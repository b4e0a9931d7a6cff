"""The planning view: the targets ranked for one model on fit, energy, latency and chips, each figure with its band.

This is what a planner choosing between chips reads first (the report opens on it). Targets that fit
come first, then lower energy per inference. A band is measured ÷ predicted over the target's back-tests
(docs/validation.md): the real figure lay within ×low–×high of the estimate on every back-test so far.
A target without back-tests says so instead of showing a bare number as if it were trusted.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .results import Result, optional


@dataclass
class PlanRow(Result):
    """One target's place in the ranking and the figures it was ranked on (per inference)."""
    rank: int
    target: str
    runs: str                           # "SNN" (the converted network) or "ANN" (a dense engine's baseline)
    fits: bool
    violations: int
    chips: int | None                   # None: the target has no core model
    energy_j: float
    energy_rank: int
    latency_s: float | None             # None: not timed
    latency_rank: int | None
    throughput_per_s: float | None
    unpriced: list[str]
    proxy: bool                         # some price or time is another chip's figure
    energy_band: dict[str, Any] | None = optional()     # {low, high, backtests, source, text}
    latency_band: dict[str, Any] | None = optional()


def _ranks(values: dict[str, float | None]) -> dict[str, int | None]:
    """1 for the smallest value; None where there is no value (a target that is not timed)."""
    order = {k: i for i, (_, k) in enumerate(sorted((v, k) for k, v in values.items() if v is not None), 1)}
    return {k: order.get(k) for k in values}


def rank(targets: dict) -> list[PlanRow]:
    """``targets``: name → TargetPlan of one report. Fitting targets first, then by energy per inference."""
    energy = _ranks({n: t.estimate.energy_j for n, t in targets.items()})
    latency = _ranks({n: t.estimate.latency_s for n, t in targets.items()})
    rows = []
    for name, t in targets.items():
        e, m = t.estimate, t.mapping
        bands = e.bands or {}
        rows.append(PlanRow(
            rank=0, target=name, runs="ANN" if t.runs == "ann" else "SNN", fits=m.fits,
            violations=len(m.violations), chips=m.chips if m.cores else None, energy_j=e.energy_j,
            energy_rank=energy[name] or 0, latency_s=e.latency_s, latency_rank=latency[name],
            throughput_per_s=e.throughput_per_s, unpriced=list(e.unpriced), proxy=bool(e.proxy_figures),
            energy_band=bands.get("energy"), latency_band=bands.get("latency")))
    rows.sort(key=lambda r: (not r.fits, r.energy_j))
    for i, r in enumerate(rows, 1):
        r.rank = i
    return rows
