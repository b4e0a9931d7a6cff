"""Graph capture: a torch.export program (or an nn.Module, exported here) → :class:`~sfn_deploy.ir.Graph`.

One rule per ATen operator family maps it onto the op vocabulary of ``ir.OPS``
(:mod:`.builder` explains the rule contract). Every operator without a rule is
collected and reported at once, with the module path and source line.

Adding a rule: write ``@rule(torch.ops.aten.<op>.<overload>)`` on a function
``(b, n) -> Node`` in the module of its family (or a new module imported below).
"""
from __future__ import annotations

import copy
import itertools

import torch
from torch.export import ExportedProgram

from ..errors import UserError
from ..ir import Graph
from . import activations, arithmetic, attention, layout, normalization, passthrough, pooling, rows, weights  # noqa: F401  (rules register on import)
from .builder import RULES, Builder

__all__ = ["RULES", "capture", "export_module"]


def export_module(model: torch.nn.Module, example: torch.Tensor) -> ExportedProgram:
    """torch.export an eval-mode module on an example batch of two (fixes the batch axis unambiguously).

    Exported is a copy that shares the parameters and buffers: tracing runs the module's own Python, and a module
    that caches tensors in its attributes (EfficientFormer-V2's attention-bias cache) would otherwise keep traced
    values there, and give the caller's module symbolic outputs afterwards."""
    shared = {id(t): t for t in itertools.chain(model.parameters(), model.buffers(), _attribute_tensors(model))}
    model = copy.deepcopy(model, shared).eval()
    x = example[:1].expand(2, *example.shape[1:]).clone() if example.shape[0] != 2 else example
    try:
        return torch.export.export(model, (x,), strict=False)
    except Exception as e:  # torch.export's own errors name the construct that failed
        first = (str(e).strip().splitlines() or [f"{type(e).__name__} with no message{_model_frame(e)}"])[0]
        raise UserError(f"torch.export could not capture the model: {first}") from e


def _model_frame(e: Exception) -> str:
    """' at file.py:line' of the innermost frame outside torch (where the model's own code failed), or ''."""
    import traceback
    frames = [f for f in traceback.extract_tb(e.__traceback__) if "/torch/" not in f.filename]
    return f" at {frames[-1].filename.rsplit('/', 1)[-1]}:{frames[-1].lineno}" if frames else ""


# composite operators written out in the operators they are made of (torch.export's own decompositions) before
# the rules run: einsum (custom attention code) becomes permutes, reshapes and batched products
DECOMPOSE = {torch.ops.aten.einsum.default}


def decompose(ep: ExportedProgram) -> ExportedProgram:
    """``ep`` with the :data:`DECOMPOSE` operators it uses decomposed (a new program; ``ep`` is left as it was)."""
    used = {n.target for n in ep.graph.nodes if n.op == "call_function"} & DECOMPOSE
    if not used:
        return ep
    table = {k: v for k, v in torch.export.default_decompositions().items() if k in used}
    return ep.run_decompositions(table)


def _attribute_tensors(model: torch.nn.Module):
    """Tensors kept in the modules' plain attributes (and in dicts, lists or tuples there): shared, not copied."""
    def walk(v, depth=0):
        if isinstance(v, torch.Tensor):
            yield v
        elif depth < 3 and isinstance(v, dict):
            for u in v.values():
                yield from walk(u, depth + 1)
        elif depth < 3 and isinstance(v, (list, tuple)):
            for u in v:
                yield from walk(u, depth + 1)
    for m in model.modules():
        for v in vars(m).values():      # (submodules yield nothing: walk enters dicts, lists and tuples only)
            yield from walk(v)


def capture(model, example: torch.Tensor | None = None) -> Graph:
    """Build the IR graph from an ExportedProgram, or from a module and an example input."""
    if isinstance(model, ExportedProgram):
        ep = model
    else:
        if example is None:
            raise UserError("capturing an nn.Module needs an example input")
        ep = export_module(model, example)
    return rows.keep_rows(Builder(decompose(ep)).build())
