"""Run a converted network on several backends and compare each with the torch reference."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from . import fidelity
from .backends import REFERENCE, get
from .data import Dataset
from .errors import UserError
from .evaluation import backend_logits, backend_runner, check_data, labeled_accuracy
from .model_file import ConvertedModel
from .results import Result, optional


@dataclass
class BackendRun(Result):
    """One backend's run over the data: wall time (s), throughput (samples/s) and agreement with the reference."""
    seconds: float                      # the run itself, set-up excluded
    setup_seconds: float                # export, session creation, a stream's start
    samples_per_s: float | None
    accuracy: float | None              # top-1, % (None: unlabeled data)
    max_abs_diff: float                 # largest |logit difference| from the reference
    prediction_agreement: float | None  # top-1 agreement with the reference, % (None: output fidelity)
    details: dict[str, Any] = field(default_factory=dict)   # the backend's own figures, as JSON keys after these
    cosine: float | None = optional()   # output fidelity: mean cosine similarity with the reference's outputs

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        return {**{k: v for k, v in d.items() if k != "details"}, **d["details"]}


@dataclass
class SimulateResult(Result):
    """A converted network run on several backends, each compared with the reference (times in s)."""
    samples: int
    reference: str
    backends: dict[str, BackendRun]
    timings: dict[str, float]           # each backend's run time, s
    max_abs_diff: float                 # the largest |logit difference| of any backend from the reference


@dataclass
class BundleRun(Result):
    """A Lava bundle run by itself on data (no reference): accuracy (%), times (s), the Lava run's figures."""
    samples: int
    backend: str
    bundle: str                         # the bundle folder
    accuracy: float | None              # None: unlabeled data
    seconds: float
    setup_seconds: float
    samples_per_s: float | None
    lava: dict[str, Any]


def simulate(converted: ConvertedModel, data: Dataset, backends: list[str], batch_size: int = 256,
             quiet: bool = True, threads: int | None = None, lava: dict | None = None) -> SimulateResult:
    for b in backends:
        get(b)
    kind = fidelity.of(converted.config)
    check_data(converted.graph, data, "converted model", kind)
    if threads:
        torch.set_num_threads(threads)
    runs: dict[str, BackendRun] = {}
    outputs = kind == "output"      # a backbone: no classes to compare
    t0 = time.perf_counter()
    ref = backend_logits(converted, data, REFERENCE, batch_size, quiet=quiet)
    t_ref = time.perf_counter() - t0
    for b in dict.fromkeys([REFERENCE, *backends]):
        setup = 0.0
        if b == REFERENCE:
            logits, secs = ref, t_ref
        else:               # export and session creation are set-up, timed apart from the run
            backend = get(b)
            t0 = time.perf_counter()
            runner = backend_runner(converted, b, threads=threads, lava=lava)
            setup = time.perf_counter() - t0
            t0 = time.perf_counter()
            size = len(data) if backend.one_stream else batch_size
            logits = torch.cat([runner(xb) for xb in data.batches(size)])
            stream_setup, secs = backend.split_time(runner, time.perf_counter() - t0)
            setup += stream_setup
        entry = BackendRun(seconds=secs, setup_seconds=setup, samples_per_s=len(data) / secs if secs else None,
                           accuracy=None if outputs else labeled_accuracy(logits.argmax(-1), data),
                           max_abs_diff=float((logits - ref).abs().max()),
                           prediction_agreement=None if outputs else
                           100.0 * float((logits.argmax(-1) == ref.argmax(-1)).float().mean()),
                           cosine=float(fidelity.cosine(logits, ref).mean()) if outputs else None)
        if b != REFERENCE:
            entry.details = backend.details(runner, converted, data, batch_size)
        runs[b] = entry
    return SimulateResult(samples=len(data), reference=REFERENCE, backends=runs,
                          timings={b: e.seconds for b, e in runs.items()},
                          max_abs_diff=max(e.max_abs_diff for e in runs.values()))


def simulate_bundle(path: str, data: Dataset, precision: str = "floating_pt") -> BundleRun:
    """Run a Lava bundle on data by itself (no converted model, so no reference to compare with)."""
    from .exporters.lava import read_bundle, run_lava, run_summary
    _, plans = read_bundle(path, precision)
    plan = plans[precision]
    if data.sample_shape != list(plan.input_shape):
        raise UserError(f"data samples have shape {data.sample_shape}, the bundle expects {plan.input_shape}")
    r = run_lava(path, data.in_memory().x.numpy(), precision)     # one stream: Lava takes every sample at once
    t = r["timings"]
    pred = torch.from_numpy(r["outputs"]).reshape(len(data), -1).argmax(-1)
    return BundleRun(samples=len(data), backend="lava", bundle=path, accuracy=labeled_accuracy(pred, data),
                     seconds=t["run_s"], setup_seconds=t["wall_s"] - t["run_s"],
                     samples_per_s=len(data) / t["run_s"] if t["run_s"] else None,
                     lava=run_summary(plan.summary(), precision, r))
