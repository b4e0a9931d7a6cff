"""The base of the typed results (estimate, report, evaluation, simulation, parity, λ search).

Each result is a dataclass whose fields are declared in the order of its JSON keys; :meth:`Result.to_dict`
gives exactly the JSON object the CLI prints with ``--json``. A field declared with :func:`optional` is left
out of the JSON while it is None (a key that only some results carry). ``result["key"]`` reads the JSON form,
for scripts written against the plain dicts these functions used to return; code in the package reads
attributes.
"""
from __future__ import annotations

import dataclasses
from typing import Any


def optional(default: Any = None) -> Any:
    """A field left out of the JSON while it is None."""
    return dataclasses.field(default=default, metadata={"optional": True})


def plain(v: Any) -> Any:
    """A result, or a container of results, as JSON-ready dicts and lists."""
    if isinstance(v, Result):
        return v.to_dict()
    if isinstance(v, dict):
        return {k: plain(x) for k, x in v.items()}
    if isinstance(v, list):
        return [plain(x) for x in v]
    if dataclasses.is_dataclass(v) and not isinstance(v, type) and hasattr(v, "to_dict"):
        return v.to_dict()
    return v


class Result:
    """A typed result serialised to its JSON object by :meth:`to_dict`."""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):      # type: ignore[arg-type]
            v = getattr(self, f.name)
            if v is None and f.metadata.get("optional"):
                continue
            out[f.name] = plain(v)
        return out

    def __getitem__(self, key: str) -> Any:
        return self.to_dict()[key]
