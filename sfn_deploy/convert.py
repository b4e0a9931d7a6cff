"""The conversion pipeline and the reference evaluation (torch backend).

``convert`` runs the passes of ``passes.PIPELINE`` and returns a
:class:`ConvertedModel`; ``evaluate`` runs a converted model on data and reports
accuracy, agreement with the ANN and the paper's energy ratio.
"""
from __future__ import annotations

import os
import time

import torch

from .calibrate import calibrate
from .capture import capture
from .config import ConvertConfig, load_config
from .data import Dataset
from .errors import UserError
from .ir import Graph, GraphError, validate_graph
from .model_file import ConvertedModel
from .passes import fold_batchnorm, insert_sfn, set_scale
from .progress import progress
from .runtime import run
from .simulators.counting import OpCounter
from .targets import load_target


def energy_constants(target: str = "cmos45") -> tuple[float, float]:
    t = load_target(target)
    return t.get("energy_pj", "ac"), t.get("energy_pj", "mac")


def check_data(graph: Graph, data: Dataset, where: str = "model") -> None:
    want = list(graph.input.shape[1:])
    got = list(data.x.shape[1:])
    if want != got:
        raise UserError(f"{data.name}: samples have shape {'×'.join(map(str, got))} but the {where} expects "
                        f"{'×'.join(map(str, want))}")
    out_shape = graph[graph.output].shape
    if len(out_shape) == 2 and len(data) and int(data.y.max()) >= out_shape[1]:
        raise UserError(f"{data.name}: labels go up to {int(data.y.max())} but the {where} has {out_shape[1]} "
                        "outputs")


def build_graph(model, data: Dataset, cfg: ConvertConfig, quiet: bool = False) -> Graph:
    """capture → fold_batchnorm → insert_sfn → calibrate, with λ = 1 everywhere."""
    graph = capture(model, data.x[:2])
    check_data(graph, data)
    out_shape = graph[graph.output].shape
    if len(out_shape) != 2:
        raise UserError(f"the model's output has shape {out_shape}; a classifier returning N×classes is expected")
    fold_batchnorm(graph)
    insert_sfn(graph, cfg.levels, cfg.fire, cfg.rounding)
    if not graph.sites:
        raise UserError("the model has no activation feeding a weight layer: nothing to convert into spikes")
    calib = data.limit(cfg.calib_limit)
    calibrate(graph, calib.batches(cfg.batch_size), cfg.percentile, quiet=quiet)
    try:        # e.g. a BatchNorm with a negative running_var folds into NaN weights
        validate_graph(graph, shapes=False)
    except GraphError as e:
        raise UserError(f"the model converts into an invalid network ({e})") from None
    return graph


def measure(graph: Graph, data: Dataset, batch_size: int = 256, spiking: bool = True,
            quiet: bool = True, desc: str = "evaluating") -> tuple[torch.Tensor, "OpCounter"]:
    """Predictions (argmax) and op counts of one pass over the data."""
    counter = OpCounter(graph, spiking)
    preds = []
    for xb in progress(data.batches(batch_size), desc, quiet=quiet, total=-(-len(data) // batch_size)):
        counter.start_batch(xb.shape[0])
        preds.append(run(graph, xb, spiking=spiking, hook=counter).argmax(-1))
    return torch.cat(preds), counter


BACKENDS = ("torch", "onnx", "nir", "lava")


def backend_runner(converted: ConvertedModel, backend: str, ann: bool = False, threads: int | None = None,
                   lava: dict | None = None):
    """A function batch → logits running the SNN (or, with ann=True, its source ANN) on a backend.

    Building it is the backend's set-up (export, session creation), kept apart so it can be timed apart.
    The NIR backend writes the file and runs what ``nir.read`` gives back (the ANN has no NIR form: torch);
    a network NIR cannot fully express runs as its partial export (NIR regions plus host nodes).
    The Lava backend writes a bundle and streams each batch through Lava processes (``lava``: precision,
    lowering, input_abs_max); the ANN has no Lava form: torch.
    """
    if backend == "lava" and not ann:
        from .exporters.lava import LavaRunner
        return LavaRunner(converted, **(lava or {}))
    if backend == "torch" or (backend in ("nir", "lava") and ann):
        return lambda xb: run(converted.graph, xb, spiking=not ann)
    if backend == "onnx":
        from .exporters.onnx import OnnxRunner, to_onnx
        runner = OnnxRunner(to_onnx(converted, ann=ann), threads=threads)
        return lambda xb: torch.from_numpy(runner.run(xb.numpy()))
    if backend == "nir":
        import tempfile

        from .exporters.nir import check_nir, export_nir, export_nir_partial, load_nir, load_partial
        try:                    # what NIR cannot express (a Transformer's host work) runs beside the NIR regions
            check_nir(converted.graph)
            partial = False
        except UserError:
            partial = True
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "model.nir")
            if partial:
                export_nir_partial(converted, path)
                module = load_partial(path)
            else:
                export_nir(converted, path)
                module = load_nir(path)
        return module
    raise UserError(f"backend {backend!r} is not available; available: {', '.join(BACKENDS)}")


def backend_logits(converted: ConvertedModel, data: Dataset, backend: str, batch_size: int = 256,
                   ann: bool = False, quiet: bool = True, threads: int | None = None,
                   lava: dict | None = None) -> torch.Tensor:
    """Logits of the SNN (or, with ann=True, its source ANN) computed by a backend."""
    runner = backend_runner(converted, backend, ann, threads, lava)
    if backend == "lava":           # one stream: Lava's set-up is paid once, samples pipeline one per step
        batch_size = len(data)
    batches = progress(data.batches(batch_size), f"{backend}{' ANN' if ann else ''}", quiet=quiet,
                       total=-(-len(data) // batch_size))
    return torch.cat([runner(xb) for xb in batches])


def accuracy(pred: torch.Tensor, y: torch.Tensor) -> float:
    return 100.0 * float((pred == y).float().mean())


def convert(model, data: Dataset, config: ConvertConfig | None = None, *, source: dict | None = None,
            quiet: bool = True, **overrides) -> ConvertedModel:
    """Convert a model (ExportedProgram or nn.Module) into a calibrated single-timestep SFN network,
    or with ``method`` (if, mtn, ecmt, pmsm) into one of the baselines of docs/methods.md.

    λ: ``scale`` fixes it; otherwise it is searched (``tune``), choosing the most accurate
    configuration, or with ``max_drop`` the lowest-energy one within that many points of the ANN.
    """
    cfg = config or load_config("", overrides)
    t0 = time.time()
    graph = build_graph(model, data, cfg, quiet)
    search: dict = {}
    extra: dict = {}
    if cfg.method == "pmsm":        # PMSM-R: entropy init + a short quantisation-aware fine-tune (docs/methods.md)
        from .pmsm import convert_pmsm
        extra["finetune"] = convert_pmsm(graph, data, cfg.levels, cfg.epochs, cfg.lr, seed=cfg.seed, quiet=quiet)
    elif cfg.method == "mbe":       # MBE: spiking decompositions of GELU/softmax/LayerNorm (docs/methods.md)
        from .mbe import convert_mbe
        extra["mbe"] = convert_mbe(graph, data.limit(cfg.calib_limit), cfg.timesteps, cfg.batch_size)
    elif cfg.method != "sfn":       # a baseline of docs/methods.md: its neurons replace the calibrated SFNs
        from .methods import apply_method
        apply_method(graph, cfg.method, cfg.timesteps, cfg.percentile, cfg.levels,
                     len(data.limit(cfg.calib_limit)), cfg.v0)
    elif cfg.scale is not None:
        set_scale(graph, cfg.scale)
    else:
        from .tuning import choose, run_search
        result = run_search(graph, data, cfg, source or {}, quiet=quiet)
        chosen = choose(result, cfg.max_drop)
        set_scale(graph, chosen["lam"])
        search = {**result, "chosen": chosen}
    converted = ConvertedModel(graph, list(data.x.shape[1:]), cfg.to_dict(), source or {}, {}, search)
    calib = data.limit(cfg.calib_limit)
    converted.metrics = {"convert_seconds": round(time.time() - t0, 3), "calibration_samples": len(calib),
                         "input_abs_max": float(calib.x.abs().max()), **extra}    # input: fixed-point encoding (Lava)
    return converted


def evaluate(converted: ConvertedModel, data: Dataset, backend: str = "torch", limit: int | None = None,
             batch_size: int = 256, quiet: bool = True, target: str = "cmos45", lava: dict | None = None) -> dict:
    """Accuracy of SNN and ANN, their top-1 agreement and the op counts / energy ratio (paper convention)."""
    if backend not in BACKENDS:
        raise UserError(f"backend {backend!r} is not available; available: {', '.join(BACKENDS)}")
    data = data.limit(limit)
    graph = converted.graph
    check_data(graph, data, "converted model")
    snn_pred, counter = measure(graph, data, batch_size, spiking=True, quiet=quiet, desc="SNN")
    if backend == "torch":
        ann_pred, _ = measure(graph, data, batch_size, spiking=False, quiet=quiet, desc="ANN")
    else:   # the op counts stay the reference counter's; predictions come from the backend
        ann_pred = backend_logits(converted, data, backend, batch_size, ann=True, quiet=quiet).argmax(-1)
        snn_pred = backend_logits(converted, data, backend, batch_size, quiet=quiet, lava=lava).argmax(-1)
    counts = counter.result()
    e_ac, e_mac = energy_constants(target)
    return {"backend": backend, "samples": len(data), "accuracy": accuracy(snn_pred, data.y),
            "ann_accuracy": accuracy(ann_pred, data.y),
            "agreement": 100.0 * float((snn_pred == ann_pred).float().mean()),
            "energy_ratio": counts.energy_ratio(e_ac, e_mac), "ac_snn": counts.ac_snn, "mac_snn": counts.mac_snn,
            "mac_ann": counts.mac_ann, "host_ops": counts.host_ops, "layers": counts.reported_layers()}
