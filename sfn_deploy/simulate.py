"""Run a converted network on several backends and compare each with the torch reference."""
from __future__ import annotations

import time

import torch

from .backends import REFERENCE, get
from .data import Dataset
from .errors import UserError
from .evaluation import accuracy, backend_logits, backend_runner, check_data
from .model_file import ConvertedModel


def simulate(converted: ConvertedModel, data: Dataset, backends: list[str], batch_size: int = 256,
             quiet: bool = True, threads: int | None = None, lava: dict | None = None) -> dict:
    for b in backends:
        get(b)
    check_data(converted.graph, data, "converted model")
    if threads:
        torch.set_num_threads(threads)
    out: dict = {"samples": len(data), "reference": REFERENCE, "backends": {}}
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
        entry = {"seconds": secs, "setup_seconds": setup, "samples_per_s": len(data) / secs if secs else None,
                 "accuracy": accuracy(logits.argmax(-1), data.y),
                 "max_abs_diff": float((logits - ref).abs().max()),
                 "prediction_agreement": 100.0 * float((logits.argmax(-1) == ref.argmax(-1)).float().mean())}
        if b != REFERENCE:
            entry.update(backend.details(runner, converted, data, batch_size))
        out["backends"][b] = entry
    out["timings"] = {b: e["seconds"] for b, e in out["backends"].items()}
    out["max_abs_diff"] = max(e["max_abs_diff"] for e in out["backends"].values())
    return out


def simulate_bundle(path: str, data: Dataset, precision: str = "floating_pt") -> dict:
    """Run a Lava bundle on data by itself (no converted model, so no reference to compare with)."""
    from .exporters.lava import read_bundle, run_lava, run_summary
    _, plans = read_bundle(path, precision)
    plan = plans[precision]
    if list(data.x.shape[1:]) != list(plan.input_shape):
        raise UserError(f"data samples have shape {list(data.x.shape[1:])}, the bundle expects {plan.input_shape}")
    r = run_lava(path, data.x.numpy(), precision)
    t = r["timings"]
    pred = torch.from_numpy(r["outputs"]).reshape(len(data), -1).argmax(-1)
    return {"samples": len(data), "backend": "lava", "bundle": path, "accuracy": accuracy(pred, data.y),
            "seconds": t["run_s"], "setup_seconds": t["wall_s"] - t["run_s"],
            "samples_per_s": len(data) / t["run_s"] if t["run_s"] else None,
            "lava": run_summary(plan.summary(), precision, r)}
