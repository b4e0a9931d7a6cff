"""What a target file may say, and the checks that turn a malformed one into a clear error.

Every number is a table ``{ value = ..., source = "..." }`` (optionally ``evidence = "proxy" |
"derived" | "uncertain" | ...``): a figure without its source is refused, so each estimate in a
report can name where its prices came from. Unknown keys are refused too (a typo would
otherwise silently leave a cost unpriced).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import NoReturn

CONVENTIONS = ("spike", "event", "channel")
SPIKES = ("none", "binary", "graded")

# section -> key -> (kind, meaning); kind "int" must be a positive integer, "num" a number ≥ 0
FIELDS: dict[str, dict[str, tuple[str, str]]] = {
    "energy_pj": {
        "ac": ("num", "one accumulate (a synaptic op of the arithmetic model)"),
        "mac": ("num", "one multiply-accumulate"),
        "synop": ("num", "one synaptic operation on a neuromorphic core (weight read included)"),
        "payload_multiply": ("num", "multiplying a graded payload by a weight, on top of the synaptic op"),
        "neuron_update": ("num", "one update of a neuron that fires"),
        "neuron_update_inactive": ("num", "one update of a silent neuron"),
        "spike": ("num", "sending one spike message"),
        "memory_bit": ("num", "reading one bit of weight memory (arithmetic targets)"),
        "host_op": ("num", "one host operation (softmax, LayerNorm, ... element)"),
    },
    "time_ns": {
        "synop": ("num", "one synaptic operation"),
        "neuron_update": ("num", "one update of a neuron that fires"),
        "neuron_update_inactive": ("num", "one update of a silent neuron"),
        "spike": ("num", "sending one spike message"),
        "barrier": ("num", "barrier synchronisation at the end of a timestep"),
        "host_op": ("num", "one host operation element"),
        "mac": ("num", "one multiply-accumulate at sustained throughput (arithmetic targets)"),
        "ac": ("num", "one accumulate at sustained throughput (arithmetic targets)"),
        "timestep": ("num", "fixed duration of one timestep (tick) of a clocked chip: a stage lasts at least this"),
    },
    "core": {
        "neurons": ("int", "neurons (compartments) per core"),
        "synapse_bits": ("int", "synaptic memory per core, bits"),
        "fan_in": ("int", "input axons per core"),
        "fan_out": ("int", "destination cores per core"),
    },
    "chip": {
        "cores": ("int", "neuro cores per chip"),
        "neurons": ("int", "neurons per chip"),
        "synapses": ("int", "synapses per chip"),
        "static_w": ("num", "static power per chip, watts"),
    },
    "precision": {
        "weight_bits": ("int", "bits per stored weight"),
        "state_bits": ("int", "bits of neuron state"),
        "payload_bits": ("int", "bits of a graded spike's payload"),
    },
    "ann_int8": {
        "mac": ("num", "one int8 multiply-accumulate of the quantised ANN baseline"),
        "memory_bit": ("num", "reading one bit of memory, ANN baseline"),
    },
}
TOP = {"name": str, "description": str, "convention": str, "spikes": str, "weight_sharing": bool, "scope": str,
       "runs": str}
SCOPES = ("per_term", "all_in")
RUNS = ("snn", "ann")       # "ann": a dense engine (GPU, int8 NPU) that runs the source ANN, the planner's baseline
# [band]: how far measurements fell from this target's estimates (docs/validation.md); key -> meaning
BANDS = {"energy": "energy per inference", "latency": "latency per inference"}


class TargetError(ValueError):
    """A target file that does not follow the schema; the message names the file and field."""


@dataclass
class Figure:
    value: float
    source: str
    evidence: str = ""


def _factor(v: float) -> str:
    """2 significant digits without exponents: 0.89, 1.9, 140."""
    return f"{v:.2g}" if v < 100 else f"{v:,.0f}"


@dataclass
class Band:
    """Measured ÷ predicted over this target's back-tests: the true figure lies within ×low–×high of the estimate
    on every back-test so far (docs/validation.md); ``backtests`` says how many there were."""
    low: float
    high: float
    backtests: int
    source: str

    def __str__(self) -> str:
        n = f"{self.backtests} back-test{'s' if self.backtests != 1 else ''}"
        return f"×{_factor(self.low)}–×{_factor(self.high)}, {n}"


@dataclass
class Target:
    name: str
    description: str
    convention: str
    spikes: str
    weight_sharing: bool = False
    path: str = ""
    figures: dict[str, dict[str, Figure]] = field(default_factory=dict)
    scope: str = "per_term"             # "all_in": the synop/MAC price includes updates, messages, memory, static
    runs: str = "snn"                   # "ann": the target runs the source ANN densely (GPU, int8 NPU baselines)
    bands: dict[str, Band] = field(default_factory=dict)

    def get(self, section: str, key: str) -> float | None:
        f = self.figures.get(section, {}).get(key)
        return None if f is None else f.value

    def figure(self, section: str, key: str) -> Figure | None:
        return self.figures.get(section, {}).get(key)

    @property
    def has_cores(self) -> bool:
        return bool(self.figures.get("core"))

    @property
    def all_in(self) -> bool:
        return self.scope == "all_in"

    def to_dict(self) -> dict:
        return {"name": self.name, "description": self.description, "convention": self.convention,
                "spikes": self.spikes, "weight_sharing": self.weight_sharing, "scope": self.scope, "runs": self.runs,
                "path": self.path,
                "figures": {s: {k: vars(f) for k, f in keys.items()} for s, keys in self.figures.items()},
                "bands": {k: vars(b) for k, b in self.bands.items()}}


def _fail(where: str, field: str, why: str) -> NoReturn:
    raise TargetError(f"{where}: {field}: {why}")


def _check_top(raw: dict, where: str) -> None:
    """Top-level keys: known, of the right type, the required ones present, enumerations respected."""
    for key in raw:
        if key not in TOP and key not in FIELDS and key != "band":
            _fail(where, key, f"unknown key; allowed: {', '.join([*TOP, *FIELDS, 'band'])}")
    for key, typ in TOP.items():
        if key in raw and not isinstance(raw[key], typ):
            _fail(where, key, f"must be a {typ.__name__}, got {raw[key]!r}")
    for key in ("name", "convention", "spikes"):
        if key not in raw:
            _fail(where, key, "missing")
    if raw["convention"] not in CONVENTIONS:
        _fail(where, "convention", f"must be one of {', '.join(CONVENTIONS)}, got {raw['convention']!r}")
    if raw["spikes"] not in SPIKES:
        _fail(where, "spikes", f"must be one of {', '.join(SPIKES)}, got {raw['spikes']!r}")
    if raw.get("scope", "per_term") not in SCOPES:
        _fail(where, "scope", f"must be one of {', '.join(SCOPES)}, got {raw['scope']!r}")
    if raw.get("runs", "snn") not in RUNS:
        _fail(where, "runs", f"must be one of {', '.join(RUNS)}, got {raw['runs']!r}")
    if raw.get("runs") == "ann" and raw["spikes"] != "none":
        _fail(where, "runs", 'a target that runs the ANN has no spikes (spikes = "none")')


def _bands(table, where: str) -> dict[str, Band]:
    """``[band] energy = { low = 0.5, high = 1.8, backtests = 3, source = "docs/validation.md" }``."""
    if not isinstance(table, dict):
        _fail(where, "band", "must be a table")
    out = {}
    for key, entry in table.items():
        name = f"band.{key}"
        if key not in BANDS:
            _fail(where, name, f"unknown key; allowed in [band]: {', '.join(BANDS)}")
        if not isinstance(entry, dict) or set(entry) != {"low", "high", "backtests", "source"}:
            _fail(where, name, "must be a table { low = ..., high = ..., backtests = ..., source = \"...\" }")
        low, high, n = entry["low"], entry["high"], entry["backtests"]
        if any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in (low, high)) or not 0 < low <= high:
            _fail(where, name, f"low and high must be numbers with 0 < low <= high, got {low!r}, {high!r}")
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            _fail(where, name, f"backtests must be a positive integer, got {n!r}")
        if not isinstance(entry["source"], str) or not entry["source"].strip():
            _fail(where, name, "source must be a non-empty string")
        out[key] = Band(float(low), float(high), n, entry["source"])
    return out


def _figure(entry, kind: str, name: str, where: str) -> Figure:
    """One ``{ value = ..., source = "...", evidence = "..." }`` table; ``kind`` "int" or "num"."""
    if not isinstance(entry, dict) or "value" not in entry or "source" not in entry:
        _fail(where, name, 'must be a table { value = ..., source = "..." } (every figure names its source)')
    extra = set(entry) - {"value", "source", "evidence"}
    if extra:
        _fail(where, name, f"unknown key(s) {', '.join(sorted(extra))}; allowed: value, source, evidence")
    v = entry["value"]
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        _fail(where, name, f"value must be a number, got {v!r}")
    if kind == "int" and (not isinstance(v, int) or v <= 0):
        _fail(where, name, f"value must be a positive integer, got {v!r}")
    if v < 0:
        _fail(where, name, f"value must not be negative, got {v!r}")
    if not isinstance(entry["source"], str) or not entry["source"].strip():
        _fail(where, name, "source must be a non-empty string")
    return Figure(float(v) if kind == "num" else v, entry["source"], str(entry.get("evidence", "")))


def parse(raw: dict, where: str) -> Target:
    _check_top(raw, where)
    figures: dict[str, dict[str, Figure]] = {}
    for section, allowed in FIELDS.items():
        table = raw.get(section, {})
        if not isinstance(table, dict):
            _fail(where, section, "must be a table")
        for key, entry in table.items():
            if key not in allowed:
                _fail(where, f"{section}.{key}", f"unknown key; allowed in [{section}]: {', '.join(allowed)}")
            figures.setdefault(section, {})[key] = _figure(entry, allowed[key][0], f"{section}.{key}", where)
    if raw["spikes"] == "none" and not {"ac", "mac"} <= set(figures.get("energy_pj", {})):
        _fail(where, "energy_pj", "an arithmetic target (spikes = \"none\") needs energy_pj.ac and energy_pj.mac")
    if raw["spikes"] != "none" and "synop" not in figures.get("energy_pj", {}):
        _fail(where, "energy_pj.synop", "a spiking target needs the energy of a synaptic operation")
    if figures.get("core") and "cores" not in figures.get("chip", {}):
        _fail(where, "chip.cores", "a target with [core] limits needs the number of cores per chip")
    return Target(raw["name"], raw.get("description", ""), raw["convention"], raw["spikes"],
                  raw.get("weight_sharing", False), where, figures, raw.get("scope", "per_term"),
                  raw.get("runs", "snn"), _bands(raw.get("band", {}), where))
