"""The converted-model file (SPEC §6): one ``torch.save`` archive of plain data and tensors.

It loads with ``torch.load(weights_only=True)``: no pickled code runs. Writes go to a
temporary name in the same folder and are renamed when complete, so an interrupted
write never leaves a half-written model.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field

import torch

from . import __version__
from .errors import UserError
from .ir import FORMAT, FORMAT_VERSION, Graph


@dataclass
class ConvertedModel:
    graph: Graph
    input_shape: list[int]                       # one sample, without the batch axis
    config: dict = field(default_factory=dict)   # the effective ConvertConfig
    source: dict = field(default_factory=dict)   # what it was converted from
    metrics: dict = field(default_factory=dict)  # validation figures at conversion time
    search: dict = field(default_factory=dict)   # λ search: study, Pareto front, choice

    @property
    def sites(self):
        return self.graph.sites

    def to_dict(self) -> dict:
        # a plain SFN network stays version 1, so older sfn-deploy releases still read it
        version = 1 if self.graph.method == "sfn" and not self.graph.stateful else FORMAT_VERSION
        return {"format": FORMAT, "format_version": version, "sfn_deploy_version": __version__,
                "graph": self.graph.to_dict(), "input_shape": list(self.input_shape), "config": self.config,
                "source": self.source, "metrics": self.metrics, "search": self.search}

    @classmethod
    def from_dict(cls, d: dict) -> "ConvertedModel":
        return cls(Graph.from_dict(d["graph"]), d["input_shape"], d.get("config", {}), d.get("source", {}),
                   d.get("metrics", {}), d.get("search", {}))


def atomic_write(path: str, write) -> None:
    """Call write(tmp_path), then rename tmp_path to path; remove the temporary file on failure."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UserError(f"{path}: output folder {folder} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.basename(path), dir=folder)
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)         # mkstemp makes 0600; give the file a normal mode
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save(model: ConvertedModel, path: str) -> None:
    atomic_write(path, lambda tmp: torch.save(model.to_dict(), tmp))


def load(path: str) -> ConvertedModel:
    if not os.path.exists(path):
        raise UserError(f"{path}: no such file")
    try:
        d = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{path}: not a converted sfn-deploy model ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else 'unreadable'})")
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        raise UserError(f"{path}: not a converted sfn-deploy model (run 'sfn-deploy convert' first)")
    v = d.get("format_version")
    if not isinstance(v, int) or v > FORMAT_VERSION:
        raise UserError(f"{path}: model format version {v} is newer than this sfn-deploy supports "
                        f"({FORMAT_VERSION}); upgrade sfn-deploy")
    try:
        return ConvertedModel.from_dict(d)
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{path}: damaged converted model ({type(e).__name__}: {e})")
