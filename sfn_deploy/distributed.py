"""Data-parallel calibration, evaluation and reports with ``torch.distributed`` (docs/data.md, "Several
processes"): ``torchrun --nproc-per-node K sfn-deploy convert|evaluate|report …``.

torchrun sets ``WORLD_SIZE``/``RANK``; :func:`world` then joins the process group (gloo: CPU). Each rank
reads its contiguous share of the data (:func:`shard`: the files of a streamed set, never the others'),
and the figures that are sums are all-reduced: calibration histograms (whose ranges are powers of two, so
any split gives the same bins, :mod:`sfn_deploy.calibrate`), repeated-value candidates, op counters;
predictions are gathered in rank order, which is the data's order. Rank 0 prints and writes the outputs
(:func:`is_writer`). Results equal one process's: tests/test_distributed.py runs two gloo ranks against one.

The λ search is not split here: its trials spread over processes and machines through a shared Optuna
storage (``tune --storage``, docs/cli.md "Many workers, many machines"); under torchrun each rank runs it.
"""
from __future__ import annotations

import atexit
import contextlib
import os
import sys
from dataclasses import dataclass
from typing import Any

import torch

from .errors import UserError


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1


_WORLD: World | None = None


def world() -> World:
    """This process's rank and the number of ranks (1: no torchrun); joins the group on first use."""
    global _WORLD
    if _WORLD is not None:
        return _WORLD
    size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if size <= 1:
        _WORLD = World()
        return _WORLD
    import torch.distributed as dist
    if not dist.is_available():
        raise UserError("WORLD_SIZE > 1 but this torch has no torch.distributed")
    if not dist.is_initialized():
        sys.stdout.flush()
        saved = os.dup(1)           # gloo prints "[Gloo] Rank 0 is connected ..." on stdout: --json keeps it clean
        try:
            with open(os.devnull, "w") as null:
                os.dup2(null.fileno(), 1)
                dist.init_process_group(backend="gloo")
        except (RuntimeError, ValueError) as e:
            raise UserError(f"cannot join the torchrun process group ({str(e).splitlines()[0]})") from None
        finally:
            os.dup2(saved, 1)
            os.close(saved)
        atexit.register(_leave)
    _WORLD = World(dist.get_rank(), dist.get_world_size())
    return _WORLD


def _leave() -> None:
    """Destroy the group before the interpreter tears down: left to static destructors, gloo's threads can abort
    the process ("terminate called without an active exception", exit -6) after the command's work is done."""
    import torch.distributed as dist
    if dist.is_initialized():
        with contextlib.suppress(RuntimeError):
            dist.destroy_process_group()


def active() -> bool:
    return world().size > 1


def is_writer() -> bool:
    """Whether this process prints and writes outputs (rank 0, or the only process)."""
    return world().rank == 0


def bounds(n: int, batch_size: int = 1) -> tuple[int, int]:
    """This rank's contiguous share [start, stop) of n samples: whole batches of ``batch_size`` (the batches one
    process would read, so per-batch figures match), the ranks' batch counts differing by at most one."""
    w = world()
    batches = -(-n // batch_size)
    lo, hi = batches * w.rank // w.size, batches * (w.rank + 1) // w.size
    return min(n, lo * batch_size), min(n, hi * batch_size)


def shard(data, batch_size: int = 1):
    """This rank's share of a Dataset (itself with one process)."""
    if not active():
        return data
    start, stop = bounds(len(data), batch_size)
    return data.subset(torch.arange(start, stop))


def _collective(fn, *args) -> None:
    """Run a collective; a rank that stopped (its own error printed) stops this one with one line too."""
    try:
        fn(*args)
    except RuntimeError as e:
        if "gloo" not in str(e).lower() and "connection" not in str(e).lower():
            raise
        raise UserError("another torchrun rank stopped (its error is above); this rank stops too") from None


def gather(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (``[obj]`` with one process)."""
    if not active():
        return [obj]
    import torch.distributed as dist
    out: list[Any] = [None] * world().size
    _collective(dist.all_gather_object, out, obj)
    return out


def sum_(t: torch.Tensor) -> torch.Tensor:
    """The element-wise sum of every rank's ``t`` (in place; ``t`` itself with one process)."""
    if active():
        import torch.distributed as dist
        _collective(dist.all_reduce, t)
    return t


def gather_cat(t: torch.Tensor) -> torch.Tensor:
    """The ranks' tensors concatenated in rank order (the data's order when each holds its :func:`shard`)."""
    return torch.cat(gather(t)) if active() else t


def reduce_max(value: float) -> float:
    return max(gather(value)) if active() else value
