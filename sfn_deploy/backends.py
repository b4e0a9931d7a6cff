"""Where a converted network runs: one :class:`Backend` protocol and one registry, :data:`BACKENDS`.

Every place that names backends reads this registry: the CLI's ``--backend``/``--against``/``--target``
choices, ``evaluate``, ``simulate``, per-layer parity, ``export`` and ``inspect``'s export list. An entry
names the module that implements it, imported on first use, so that ``sfn-deploy --help`` (which lists
the names) loads neither onnxruntime nor Lava.

Adding a backend: one module with an object following :class:`Backend` (:class:`Exporter` if it also
writes files) named ``BACKEND``, and one :class:`Entry` line in :data:`BACKENDS`.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, cast

from .errors import UserError

REFERENCE = "torch"     # the backend whose op counts and outputs the others are compared with


class Backend(Protocol):
    """How a backend runs a converted network (its name and description are its registry entry's)."""
    runs_ann: bool          # it can run the source ANN too (else the ANN runs on the reference)
    one_stream: bool        # it runs all samples as one stream (its set-up is paid once per run)

    def runner(self, model, *, ann: bool = False, threads: int | None = None,
               options: dict | None = None) -> Callable[[Any], Any]:
        """A function batch → logits; building it is the backend's set-up (export, session), timed apart."""

    def layers(self, model, x, batch_size: int, options: dict | None = None) -> dict:
        """For per-layer parity: ``outputs`` and, per SFN site where it can, ``levels`` and ``pre``
        (numpy arrays, one row per sample)."""

    def split_time(self, runner, seconds: float) -> tuple[float, float]:
        """(set-up, run) seconds of a stream that took ``seconds`` (a stream may start a simulator)."""

    def details(self, runner, model, data, batch_size: int) -> dict:
        """Extra keys of its ``simulate`` entry (level agreement, simulator counters)."""

    def parity_info(self, options: dict | None) -> dict:
        """Extra keys of a parity row that involves it (its settings)."""


class Simple:
    """The defaults of a backend whose set-up is not timed apart and that adds nothing to ``simulate`` or parity
    rows (torch, NIR); a backend subclasses it and writes the rest of :class:`Backend`."""

    def split_time(self, runner, seconds: float) -> tuple[float, float]:
        return 0.0, seconds

    def details(self, runner, model, data, batch_size: int) -> dict:
        return {}

    def parity_info(self, options: dict | None) -> dict:
        return {}


class Exporter(Backend, Protocol):
    """A backend that also writes a file or folder (``sfn-deploy export --target``)."""
    writes_folder: bool     # its export is a folder (replaced as a whole)

    def export(self, model, path: str, **options) -> dict:
        """Write ``path``; return what was written (the ``--json`` payload)."""

    def describe_export(self, info: dict) -> str:
        """One line (or a few) for the terminal about what ``export`` wrote."""

    def support(self, model) -> str:
        """What this target makes of the network, for ``inspect`` (without writing anything)."""


@dataclass(frozen=True)
class Entry:
    name: str
    description: str
    module: str                                 # imported on first use; holds ``BACKEND``
    export_options: tuple[str, ...] | None = None  # its ``export`` command options; None: not an export target

    def load(self) -> Backend:
        return importlib.import_module(self.module).BACKEND


BACKENDS: dict[str, Entry] = {e.name: e for e in (
    Entry("torch", "the reference interpreter (PyTorch)", "sfn_deploy.torch_backend"),
    Entry("onnx", "standard ONNX operators run by onnxruntime", "sfn_deploy.exporters.onnx",
          ("levels", "ann", "opset")),
    Entry("nir", "a NIR graph read back and run by nirtorch (partial: NIR regions plus host nodes)",
          "sfn_deploy.exporters.nir", ("partial", "max_size")),
    Entry("lava", "Lava processes on Loihi2SimCfg (graded or channel lowering, floating or fixed point)",
          "sfn_deploy.exporters.lava", ("lowering", "data", "avg_pool")),
)}


def names() -> list[str]:
    return list(BACKENDS)


def export_targets() -> list[str]:
    return [n for n, e in BACKENDS.items() if e.export_options is not None]


def get(name: str) -> Backend:
    if name not in BACKENDS:
        raise UserError(f"backend {name!r} is not available; available: {', '.join(BACKENDS)}")
    return BACKENDS[name].load()


def get_exporter(name: str) -> Exporter:
    """An export target's backend (refused, like an unknown name, for a backend that writes nothing)."""
    if name not in export_targets():
        raise UserError(f"export target {name!r} is not available; available: {', '.join(export_targets())}")
    return cast(Exporter, BACKENDS[name].load())     # its Entry declares export options


def takes(option: str) -> list[str]:
    """The export targets that take an ``export`` option."""
    return [n for n, e in BACKENDS.items() if option in (e.export_options or ())]


def help_text(names_: list[str] | None = None) -> str:
    """'name = description; ...' for --help."""
    return "; ".join(f"{n} = {BACKENDS[n].description}" for n in (names_ or names()))
