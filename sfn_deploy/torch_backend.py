"""The ``torch`` backend: the reference interpreter, the ground truth every other backend is compared with."""
from __future__ import annotations

import numpy as np
import torch

from .model_file import ConvertedModel
from .runtime import run, signed_table


class TorchBackend:
    runs_ann = True
    one_stream = False

    def runner(self, model: ConvertedModel, *, ann: bool = False, threads: int | None = None,
               options: dict | None = None):
        return lambda xb: run(model.graph, xb, spiking=not ann)

    def layers(self, model: ConvertedModel, x: torch.Tensor, batch_size: int, options: dict | None = None) -> dict:
        """Levels and pre-activations of every site, read from the interpreter's hook."""
        levels: dict = {}
        pre: dict = {}
        outs = []

        def keep(node, args, out, extra):
            if "position" in extra:
                pos = extra["position"]
                lv = torch.index_select(signed_table(node), 0, pos.reshape(-1)).view(pos.shape)
                levels.setdefault(node.name, []).append(lv.reshape(lv.shape[0], -1).numpy())
                pre.setdefault(node.name, []).append(args[0].reshape(args[0].shape[0], -1).numpy())
        for i in range(0, len(x), batch_size):
            outs.append(run(model.graph, x[i:i + batch_size], hook=keep).numpy())
        cat = lambda d: {k: np.concatenate(v) for k, v in d.items()}     # noqa: E731
        return {"outputs": np.concatenate(outs), "levels": cat(levels), "pre": cat(pre)}

    def split_time(self, runner, seconds: float) -> tuple[float, float]:
        return 0.0, seconds

    def details(self, runner, model: ConvertedModel, data, batch_size: int) -> dict:
        return {}

    def parity_info(self, options: dict | None) -> dict:
        return {}


BACKEND = TorchBackend()
