"""Run a converted network on several backends and compare each with the torch reference."""
from __future__ import annotations

import time

import torch

from .convert import BACKENDS, accuracy, backend_logits, backend_runner, check_data
from .data import Dataset
from .errors import UserError
from .model_file import ConvertedModel
from .runtime import run_with_levels


def _level_agreement(converted: ConvertedModel, data: Dataset, backend: str, batch_size: int) -> dict:
    """Share of spike levels equal to the reference at every site, and the first site that differs."""
    if backend != "onnx":
        return {}
    from .exporters.onnx import OnnxRunner, to_onnx
    runner = OnnxRunner(to_onnx(converted, levels=True))
    same = total = 0
    first = None
    order = [s.name for s in converted.sites]
    for xb in data.batches(batch_size):
        _, ref = run_with_levels(converted.graph, xb)
        _, levels = runner.run_with_levels(xb.numpy())
        for name in order:
            eq = torch.from_numpy(levels[name]).to(torch.int64) == ref[name]
            same += int(eq.sum())
            total += eq.numel()
            if first is None and not bool(eq.all()):
                first = name
    return {"level_agreement": 100.0 * same / max(total, 1), "first_differing_site": first}


def _lava_entry(summary: dict, precision: str, result: dict) -> dict:
    """What a Lava run did: processes on neuro-cores and on the host (the plan's ``summary``), phases of its
    time, fixed-point counters (accumulator overflows and membrane saturations per neuron block, wraps per conv)."""
    t = result["timings"]
    return {"precision": precision, "lowering": summary["lowering"], "processes": summary["processes"],
            "neuro_core_processes": summary["neuro_core_processes"], "host_processes": summary["host_processes"],
            "host_ops": summary["host_ops"], "latency_steps": summary["latency_steps"],
            "steps_per_s": t["steps"] / t["run_s"] if t["run_s"] else None,
            "phases_s": {k: t[k] for k in ("build_s", "compile_s", "run_s", "stop_s", "wall_s")},
            "counts": result["counts"], "overflows": result["overflows"], "saturations": result["saturations"]}


def simulate(converted: ConvertedModel, data: Dataset, backends: list[str], batch_size: int = 256,
             quiet: bool = True, threads: int | None = None, lava: dict | None = None) -> dict:
    for b in backends:
        if b not in BACKENDS:
            raise UserError(f"backend {b!r} is not available; available: {', '.join(BACKENDS)}")
    check_data(converted.graph, data, "converted model")
    if threads:
        torch.set_num_threads(threads)
    out: dict = {"samples": len(data), "reference": "torch", "backends": {}}
    t0 = time.perf_counter()
    ref = backend_logits(converted, data, "torch", batch_size, quiet=quiet)
    t_ref = time.perf_counter() - t0
    for b in dict.fromkeys(["torch", *backends]):
        setup = 0.0
        if b == "torch":
            logits, secs = ref, t_ref
        else:               # export and session creation are set-up, timed apart from the run
            t0 = time.perf_counter()
            runner = backend_runner(converted, b, threads=threads, lava=lava)
            setup = time.perf_counter() - t0
            t0 = time.perf_counter()
            size = len(data) if b == "lava" else batch_size     # Lava: one stream, set-up paid once
            logits = torch.cat([runner(xb) for xb in data.batches(size)])
            secs = time.perf_counter() - t0
            if b == "lava":     # the worker's start, Lava's compile and stop are set-up; the run is the stream
                t = runner.last["timings"]
                setup += secs - t["run_s"]
                secs = t["run_s"]
        entry = {"seconds": secs, "setup_seconds": setup, "samples_per_s": len(data) / secs if secs else None,
                 "accuracy": accuracy(logits.argmax(-1), data.y),
                 "max_abs_diff": float((logits - ref).abs().max()),
                 "prediction_agreement": 100.0 * float((logits.argmax(-1) == ref.argmax(-1)).float().mean())}
        if b == "lava":
            entry["lava"] = _lava_entry(runner.summary, runner.precision, runner.last)
        elif b != "torch":
            entry.update(_level_agreement(converted, data, b, batch_size))
        out["backends"][b] = entry
    out["timings"] = {b: e["seconds"] for b, e in out["backends"].items()}
    out["max_abs_diff"] = max(e["max_abs_diff"] for e in out["backends"].values())
    return out


def simulate_bundle(path: str, data: Dataset, precision: str = "floating_pt") -> dict:
    """Run a Lava bundle on data by itself (no converted model, so no reference to compare with)."""
    from .exporters.lava import read_bundle, run_lava
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
            "lava": _lava_entry(plan.summary(), precision, r)}
