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
TOP = {"name": str, "description": str, "convention": str, "spikes": str, "weight_sharing": bool}


class TargetError(ValueError):
    """A target file that does not follow the schema; the message names the file and field."""


@dataclass
class Figure:
    value: float
    source: str
    evidence: str = ""


@dataclass
class Target:
    name: str
    description: str
    convention: str
    spikes: str
    weight_sharing: bool = False
    path: str = ""
    figures: dict[str, dict[str, Figure]] = field(default_factory=dict)

    def get(self, section: str, key: str) -> float | None:
        f = self.figures.get(section, {}).get(key)
        return None if f is None else f.value

    def figure(self, section: str, key: str) -> Figure | None:
        return self.figures.get(section, {}).get(key)

    @property
    def has_cores(self) -> bool:
        return bool(self.figures.get("core"))

    def to_dict(self) -> dict:
        return {"name": self.name, "description": self.description, "convention": self.convention,
                "spikes": self.spikes, "weight_sharing": self.weight_sharing, "path": self.path,
                "figures": {s: {k: vars(f) for k, f in keys.items()} for s, keys in self.figures.items()}}


def _fail(where: str, field: str, why: str) -> NoReturn:
    raise TargetError(f"{where}: {field}: {why}")


def _check_top(raw: dict, where: str) -> None:
    """Top-level keys: known, of the right type, the required ones present, enumerations respected."""
    for key in raw:
        if key not in TOP and key not in FIELDS:
            _fail(where, key, f"unknown key; allowed: {', '.join([*TOP, *FIELDS])}")
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
                  raw.get("weight_sharing", False), where, figures)
