"""The ``torch`` backend: the reference interpreter, the ground truth every other backend is compared with."""
from __future__ import annotations

import numpy as np
import torch

from .backends import Simple
from .model_file import ConvertedModel
from .neurons import signed_table
from .samples import Rows
from .simulators.interpreter import Event, Observer, run


class SiteRecorder(Observer):
    """Each site's signed levels and pre-activations (one row per sample, sfn_deploy.samples), batch after batch;
    the Lava integer reference records with it too."""

    def __init__(self, graph) -> None:
        self.levels: dict[str, list] = {}
        self.pre: dict[str, list] = {}
        self.rows = Rows(graph)

    def __call__(self, event: Event) -> None:
        pos = event.position
        if pos is None:
            return
        name = event.node.name
        lv = torch.index_select(signed_table(event.node), 0, pos.reshape(-1)).view(pos.shape)
        self.levels.setdefault(name, []).append(self.rows(name, lv).numpy())
        self.pre.setdefault(name, []).append(self.rows(name, event.args[0]).numpy())


class TorchBackend(Simple):
    runs_ann = True
    one_stream = False

    def runner(self, model: ConvertedModel, *, ann: bool = False, threads: int | None = None,
               options: dict | None = None):
        return lambda xb: run(model.graph, xb, spiking=not ann)

    def layers(self, model: ConvertedModel, x: torch.Tensor, batch_size: int, options: dict | None = None) -> dict:
        """Levels and pre-activations of every site, as the interpreter's observer sees them."""
        keep = SiteRecorder(model.graph)
        outs = [run(model.graph, x[i:i + batch_size], hook=keep).numpy() for i in range(0, len(x), batch_size)]
        cat = lambda d: {k: np.concatenate(v) for k, v in d.items()}     # noqa: E731
        return {"outputs": np.concatenate(outs), "levels": cat(keep.levels), "pre": cat(keep.pre)}


BACKEND = TorchBackend()
