"""``apply`` of the methods whose code keeps its own signature (:mod:`sfn_deploy.pmsm`, :mod:`sfn_deploy.mbe`):
the registry in :mod:`sfn_deploy.methods` names these adapters."""
from __future__ import annotations

from .ir import Graph
from .mbe import convert_mbe
from .methods import Applied
from .pmsm import convert_pmsm


def apply_pmsm(graph: Graph, data, config, *, source: dict | None = None, quiet: bool = True) -> Applied:
    """PMSM-R: entropy initialisation + a short quantisation-aware fine-tune (docs/methods.md)."""
    finetune = convert_pmsm(graph, data, config.levels, config.epochs, config.lr, seed=config.seed, quiet=quiet)
    return Applied(metrics={"finetune": finetune})


def apply_mbe(graph: Graph, data, config, *, source: dict | None = None, quiet: bool = True) -> Applied:
    """MBE: spiking decompositions of GELU, softmax and LayerNorm (docs/methods.md)."""
    return Applied(metrics={"mbe": convert_mbe(graph, data.limit(config.calib_limit), config.timesteps,
                                               config.batch_size)})
