"""Per-layer parity between two backends: which SFN site is the first to disagree, and by how much.

Every backend gives, for the same samples, the network output and (where it can) each SFN site's
integer spike levels and pre-activations (the neuron's input). Sites are compared in graph order,
so the first one that differs is where the two simulations part ways; everything after it inherits
the difference.

Each backend gives its per-layer data through :meth:`sfn_deploy.backends.Backend.layers`: torch (levels
and pre-activations, from the reference interpreter), onnx (levels, from the level-output export), lava
(levels and membrane potentials read from the neurons' taps; fixed point dequantised with the neuron's
scale), nir (levels decoded from each site's threshold channels as nirtorch computes them).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from . import fidelity
from .backends import REFERENCE, get
from .data import Dataset
from .errors import UserError
from .model_file import ConvertedModel
from .results import Result, optional


@dataclass
class SiteParity(Result):
    """One SFN site compared between two backends: equal spike levels (%), largest differences, samples hit."""
    site: str
    role: str | None = None
    levels_equal: float | None = None   # % of levels equal; None where one side has no per-layer data
    max_level_diff: int | None = optional()
    samples_differing: int | None = optional()
    max_pre_diff: float | None = optional()     # largest |pre-activation difference|, where both sides give them


@dataclass
class FirstDiffering(Result):
    """The first site in graph order whose spike levels differ (where the two simulations part ways)."""
    site: str
    levels_equal: float                 # % of levels equal
    max_level_diff: int
    samples_differing: int
    max_pre_diff: float | None = optional()


@dataclass
class ParityRow(Result):
    """One backend compared with another site by site: the per-site rows and the output difference."""
    reference: str
    backend: str
    samples: int
    layers: list[SiteParity]
    first_differing: FirstDiffering | None
    output_max_abs_diff: float          # largest |logit difference|
    prediction_agreement: float | None  # top-1 agreement, % (None: output fidelity)
    compared_sites: int                 # sites with levels on both sides
    info: dict[str, Any] = field(default_factory=dict)  # the backends' settings (Lava: precision, lowering)
    cosine: float | None = optional()   # output fidelity: mean cosine similarity of the outputs

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        return {**{k: v for k, v in d.items() if k != "info"}, **d["info"]}


def layer_outputs(model: ConvertedModel, backend: str, data: Dataset, batch_size: int = 256,
                  lava: dict | None = None) -> dict:
    """Output, and per-site levels / pre-activations where the backend exposes them."""
    return get(backend).layers(model, data.in_memory().x, batch_size, lava)


def compare(model: ConvertedModel, ref: dict, other: dict, ref_name: str, other_name: str) -> ParityRow:
    """Site by site in graph order: share of equal levels, largest level difference, samples affected,
    largest pre-activation difference; and the first site that differs."""
    layers = []
    first = None
    for site in model.sites:
        name = site.name
        row = SiteParity(site=name, role=site.attrs.get("role"))
        if name in ref["levels"] and name in other["levels"]:
            a, b = ref["levels"][name], other["levels"][name]
            if a.shape != b.shape:
                raise UserError(f"parity: {name} has shape {a.shape} on {ref_name} and {b.shape} on {other_name}")
            diff = a != b
            row.levels_equal = 100.0 * float(1 - diff.mean())
            row.max_level_diff = int(np.abs(a - b).max())
            row.samples_differing = int(diff.any(axis=1).sum())
            if first is None and diff.any():
                first = FirstDiffering(site=name, levels_equal=row.levels_equal, max_level_diff=row.max_level_diff,
                                       samples_differing=row.samples_differing)
        if name in ref["pre"] and name in other["pre"]:
            d = np.abs(ref["pre"][name].astype(np.float64) - other["pre"][name].astype(np.float64))
            row.max_pre_diff = float(d.max())
            if first is not None and first.site == name:
                first.max_pre_diff = row.max_pre_diff
        layers.append(row)
    out = np.abs(ref["outputs"].astype(np.float64) - other["outputs"].astype(np.float64))
    agree = ref["outputs"].reshape(len(out), -1).argmax(-1) == other["outputs"].reshape(len(out), -1).argmax(-1)
    outputs = fidelity.of(model.config) == "output"      # a backbone: no classes to agree on
    cos = fidelity.cosine(torch.from_numpy(np.asarray(other["outputs"])),
                          torch.from_numpy(np.asarray(ref["outputs"]))) if outputs else None
    return ParityRow(reference=ref_name, backend=other_name, samples=int(len(out)), layers=layers,
                     first_differing=first, output_max_abs_diff=float(out.max()),
                     prediction_agreement=None if outputs else 100.0 * float(agree.mean()),
                     compared_sites=sum(r.levels_equal is not None for r in layers),
                     cosine=None if cos is None else float(cos.mean()))


def parity(model: ConvertedModel, data: Dataset, backends: list[str], against: str = REFERENCE,
           batch_size: int = 256, lava: dict | None = None) -> list[ParityRow]:
    ref = layer_outputs(model, against, data, batch_size, lava)
    rows: list[ParityRow] = []
    for b in backends:
        if b == against:
            continue
        other = layer_outputs(model, b, data, batch_size, lava)
        rows.append(compare(model, ref, other, against, b))
        # a backend's own reference (Lava fixed point: the integer reference, exporters/lava/reference.py): the
        # backend against it, and it against --against
        for name, own in other.get("references", {}).items():
            rows += [compare(model, own, other, name, b), compare(model, ref, own, against, name)]
    info: dict = {}             # each involved backend's settings (Lava: precision, lowering), on every row
    for b in dict.fromkeys([*backends, against]):
        info.update(get(b).parity_info(lava))
    for r in rows:
        r.info = dict(info)
    return rows


def format_parity(r: ParityRow) -> str:
    lava = r.info.get("lava")
    where = f" [Lava {lava['precision']}, {lava['lowering']}]" if lava is not None else ""
    agreed = (f"cosine {r.cosine:.6f}" if r.cosine is not None else
              f"top-1 agreement {r.prediction_agreement:.2f}%")
    lines = [f"per-layer parity, {r.backend} against {r.reference}{where} ({r.samples} samples): "
             f"outputs max|Δ| {r.output_max_abs_diff:.3g}, {agreed}"]
    for row in r.layers:
        if row.levels_equal is None:
            lines.append(f"  {row.site:<45} (no per-layer data on one side)")
            continue
        pre = f"  pre max|Δ| {row.max_pre_diff:.3g}" if row.max_pre_diff is not None else ""
        lines.append(f"  {row.site:<45} levels equal {row.levels_equal:8.4f}%  max|Δlevel| "
                     f"{row.max_level_diff:<4} samples differing {row.samples_differing:<5}{pre}")
    f = r.first_differing
    if f:
        lines.append(f"first differing layer: {f.site} ({100 - f.levels_equal:.4f}% of levels differ, "
                     f"by up to {f.max_level_diff}, in {f.samples_differing} samples)")
    elif r.compared_sites:
        lines.append("every compared layer is identical")
    return "\n".join(lines)
