"""Where the interpreter computes: ``--device auto|cpu|cuda[:N]``.

The graph stays on the CPU, where every pass, exporter and file writer expects it; :func:`run` of the
interpreter computes on a *mirror* of it on the selected device (:func:`mirror`: the same nodes, their
parameters copied once and again only when a pass replaced one, e.g. ``passes.configure`` in the λ search),
moves each batch there and hands its output back on the CPU. Observers (calibration, op counting) see the
mirror's tensors and keep only small host-side totals.

A GPU computes the weight layers in another summation order than the CPU, so a site input within an ulp of a
firing boundary can fall on the other side (as between torch and onnxruntime, docs/onnx.md); TensorFloat-32,
which would make *every* product inexact, is turned off when a GPU is selected. The fire rule and the counting
are exact on both: the same float32 comparisons and integer sums.
"""
from __future__ import annotations

import os
from dataclasses import replace

import torch

from .errors import UserError
from .ir import Graph
from .neurons import NODE_CACHE

_CPU = torch.device("cpu")
_current: list = [_CPU, False]          # the device, and whether the user named it (not auto)


def resolve(spec: str | None) -> torch.device:
    """The device a ``--device`` value names; refused (one line) when it is not here. ``auto``: a GPU if there is
    one, else the CPU; ``auto`` and ``cuda`` under torchrun: the GPU of this rank's LOCAL_RANK."""
    spec = (spec or "auto").strip().lower()
    if spec == "cpu":
        return _CPU
    if spec == "auto":
        if not torch.cuda.is_available():
            return _CPU
        return torch.device("cuda", _local_gpu())
    head, _, index = spec.partition(":")
    if head != "cuda" or (index and not index.isdigit()):
        raise UserError(f"--device {spec}: expected auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise UserError(f"--device {spec}: no CUDA GPU is available here (torch {torch.__version__}, "
                        f"CUDA build {torch.version.cuda or 'none'}); use --device cpu")
    n = torch.cuda.device_count()
    if index and int(index) >= n:
        raise UserError(f"--device {spec}: this machine has {n} GPU{'s' if n != 1 else ''} (cuda:0..cuda:{n - 1})")
    return torch.device("cuda", int(index) if index else _local_gpu())


def _local_gpu() -> int:
    """This process's GPU: under torchrun its LOCAL_RANK's (modulo the GPUs there), else the first."""
    return int(os.environ.get("LOCAL_RANK", "0") or 0) % torch.cuda.device_count()


def select(device: torch.device | str | None) -> torch.device:
    """Make ``device`` the one :func:`current` returns (the CLI does this once per command)."""
    dev = device if isinstance(device, torch.device) else resolve(device)
    named = isinstance(device, torch.device) or (device or "auto").strip().lower() != "auto"
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        torch.backends.cuda.matmul.allow_tf32 = False       # full float32 products: TF32 keeps 10 mantissa bits
        torch.backends.cudnn.allow_tf32 = False
    _current[:] = [dev, named]
    return dev


def current() -> torch.device:
    return _current[0]


def named() -> bool:
    """Whether the current device was asked for by name: a graph the GPU path does not run is then refused,
    while ``auto`` runs it on the CPU."""
    return _current[1]


def mirror(graph: Graph, device: torch.device) -> Graph:
    """``graph`` with its parameters on ``device`` (the graph itself when that is the CPU): a Graph of mirror
    nodes sharing names, inputs and attrs with the source, each kept in ``NODE_CACHE`` beside its source node and
    copied again only when one of its parameters was replaced."""
    if device.type == "cpu":
        return graph
    return _mirrored(graph, device)


def _mirrored(graph: Graph, device: torch.device) -> Graph:
    nodes = [NODE_CACHE.get(n, ("mirror", device), tuple(n.params.values()),
                            lambda n=n: replace(n, params={k: _to(v, device) for k, v in n.params.items()}))
             for n in graph.nodes]
    return Graph(nodes, graph.output, graph.timesteps, graph.method, graph.output_parts)


def _to(v, device: torch.device):
    return v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
