"""Lava target (SPEC §7): the converted SFN network as Lava processes, simulated with Loihi2SimCfg.

* :func:`export_lava` writes a bundle folder (``manifest.json`` + ``arrays.npz``, see :mod:`.bundle`)
  holding the lowering in floating and fixed point;
* :func:`load_network` builds a bundle's processes for one's own Lava program (input and output
  ports, latency);
* :func:`run_lava` streams samples through a bundle (one sample per timestep) in a killable
  subprocess and returns outputs, per-site spike levels and pre-activations, fixed-point counters
  and timings.

How the network is lowered is in :mod:`.plan`; the processes are in :mod:`.procs.processes`.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np

from ...errors import UserError
from ...model_file import ConvertedModel
from .build import LavaNetwork, build
from .bundle import read_bundle, write_bundle
from .plan import LOWERINGS, PRECISIONS, lower
from .worker import USER_ERROR

__all__ = ["export_lava", "load_network", "run_lava", "read_bundle", "lower", "LOWERINGS", "PRECISIONS", "LavaNetwork"]


def plans_for(model: ConvertedModel, lowering: str = "graded", input_abs_max: float | None = None,
              avg_pool: str = "folded"):
    """Both precisions' plans (fixed point left out, with the reason, where it cannot be planned)."""
    plans, missing = {}, {}
    for p in PRECISIONS:
        try:
            plans[p] = lower(model, lowering, p, input_abs_max, avg_pool)
        except UserError as e:
            if p == "floating_pt":
                raise
            missing[p] = str(e)
    return plans, missing


def export_lava(model: ConvertedModel, path: str, lowering: str = "graded",
                input_abs_max: float | None = None, avg_pool: str = "folded") -> dict:
    """Write the bundle folder atomically; return a summary (processes by kind, host work, latency).
    The fixed-point input encoding uses ``input_abs_max``, by default the calibration range the
    conversion recorded. ``avg_pool``: average pooling of spikes folded into the next layer's weights, or
    a pooling layer (docs/lava.md, "Events: folded vs a pooling layer")."""
    if input_abs_max is None:
        input_abs_max = model.metrics.get("input_abs_max")
    plans, missing = plans_for(model, lowering, input_abs_max, avg_pool)
    info = {"lowering": lowering, "avg_pool": avg_pool, "source": model.source, "input_shape": list(model.input_shape),
            "missing": missing, "input_abs_max": input_abs_max,
            "preprocessing": None if model.preprocessing is None else model.preprocessing.to_dict(),  # docs/data.md
            "classes": model.classes, "output_parts": model.graph.output_parts}
    write_bundle(path, plans, info)
    plan = plans["floating_pt"]
    return {"path": path, "format": "lava", "precisions": list(plans), "missing": missing, **plan.summary(),
            "summaries": {p: pl.summary() for p, pl in plans.items()},
            "bytes": sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))}


def load_network(path: str, precision: str = "floating_pt") -> LavaNetwork:
    """The bundle's processes, connected, ready to be wired into one's own Lava program."""
    _, plans = read_bundle(path, precision)
    return build(plans[precision])


def _kill_group(proc: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):       # SIGTERM first: lets Lava's tracker free shared memory
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            continue


def run_lava(bundle: str, x: np.ndarray, precision: str = "floating_pt", record: bool = False,
             timeout: float = 600.0, neuron: str = "sfn") -> dict:
    """Stream the samples x (N, *input_shape) through the bundle, one per timestep.

    Returns ``outputs`` (N, *output_shape), and per SFN site (when ``record``) ``levels`` and
    ``pre`` (membrane: float, or integer in fixed point with its ``scale``), ``counts`` (fixed
    point: accumulator overflows and membrane saturations per neuron block, wraps per conv, and their
    totals ``overflows`` and ``saturations``), and ``timings``. The run happens in a subprocess in its own
    process group, killed on timeout.

    The bundle is checked here (checksum, structure) before the subprocess starts; the worker runs it only
    if it still has the checksum checked here."""
    manifest, plans = read_bundle(bundle, precision)
    plan = plans[precision]
    n = int(x.shape[0])
    if tuple(x.shape[1:]) != tuple(plan.input_shape):
        raise UserError(f"Lava run: samples have shape {list(x.shape[1:])}, the bundle expects {plan.input_shape}")
    steps = n + plan.latency
    with tempfile.TemporaryDirectory(prefix="sfn-lava-") as work:
        data = np.zeros((steps, int(np.prod(plan.input_shape))), np.float64)
        data[:n] = x.reshape(n, -1)
        np.save(os.path.join(work, "input.npy"), data)
        job = {"bundle": os.path.abspath(bundle), "precision": precision, "input": os.path.join(work, "input.npy"),
               "workdir": work, "steps": steps, "record": record, "neuron": neuron, "sha256": manifest["sha256"]}
        with open(os.path.join(work, "job.json"), "w") as f:
            json.dump(job, f)
        t0 = time.perf_counter()
        with open(os.path.join(work, "log.txt"), "w") as log:
            proc = subprocess.Popen([sys.executable, "-m", "sfn_deploy.exporters.lava.worker",
                                     os.path.join(work, "job.json")], stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
            try:
                rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                raise UserError(f"Lava run timed out after {timeout:.0f} s ({n} samples, {steps} steps); "
                                "the simulation was killed") from None
            finally:
                _kill_group(proc)                       # Lava's forked children, whatever happened
        wall = time.perf_counter() - t0
        refused = os.path.join(work, "user_error.txt")
        if rc == USER_ERROR and os.path.exists(refused):
            with open(refused) as f:
                raise UserError(f.read().strip())
        if rc != 0 or not os.path.exists(os.path.join(work, "result.json")):
            with open(os.path.join(work, "log.txt")) as f:
                tail = f.read()[-3000:]
            raise RuntimeError(f"Lava run failed (exit code {rc}):\n{tail}")
        with open(os.path.join(work, "result.json")) as f:
            timings = json.load(f)
        timings["wall_s"] = wall
        out = np.load(os.path.join(work, "output.npy"))[plan.latency:plan.latency + n]
        result = {"outputs": out.reshape((n, *plan.output_shape)), "timings": timings, "latency": plan.latency,
                  "levels": {}, "pre": {}, "counts": {}, "scales": {}}
        for site, info in (plan.sites.items() if neuron == "sfn" else ()):
            base = os.path.join(work, info["block"])
            s = info["stage"]
            if record:
                result["levels"][site] = np.load(base + ".level.npy")[s:s + n].copy()
                result["pre"][site] = np.load(base + ".pre.npy")[s:s + n].copy()
            result["scales"][site] = info.get("scale", 1.0)
        for b in plan.blocks:           # neurons: [overflows, saturations]; fixed-point convs: [wraps, 0]
            counts = os.path.join(work, b.name + ".count.npy")
            if os.path.exists(counts):
                result["counts"][b.name] = np.load(counts)[0].tolist()
        result["overflows"] = sum(v[0] for v in result["counts"].values())
        result["saturations"] = sum(v[1] for v in result["counts"].values())
        return result


class LavaRunner:
    """The Lava backend of ``simulate``/``evaluate``: writes a bundle once (set-up), then streams each
    batch through it. ``last`` keeps the latest run's result (levels, counters, timings)."""

    def __init__(self, model: ConvertedModel, precision: str = "floating_pt", lowering: str = "graded",
                 input_abs_max: float | None = None, record: bool = False, timeout: float = 900.0,
                 avg_pool: str = "folded"):
        if precision not in PRECISIONS:
            raise UserError(f"unknown Lava precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
        self._tmp = tempfile.TemporaryDirectory(prefix="sfn-lava-bundle-")
        self.path = os.path.join(self._tmp.name, "bundle")
        self.info = export_lava(model, self.path, lowering, input_abs_max, avg_pool)
        if precision in self.info["missing"]:       # refuse with the plan's own reason
            raise UserError(self.info["missing"][precision])
        self.summary = self.info["summaries"][precision]
        self.precision, self.record, self.timeout = precision, record, timeout
        self.last: dict | None = None

    def __call__(self, xb):
        import torch
        self.last = run_lava(self.path, xb.numpy(), self.precision, record=self.record, timeout=self.timeout)
        return torch.from_numpy(np.asarray(self.last["outputs"], np.float32))

    def plan(self):
        """The plan of this run's precision, as the bundle holds it (the arrays that run)."""
        return read_bundle(self.path, self.precision)[1][self.precision]

    def result(self) -> dict:
        """The latest run's result (``last``), once there was a run."""
        if self.last is None:
            raise RuntimeError("the Lava runner has not run yet")
        return self.last


def run_summary(summary: dict, precision: str, result: dict) -> dict:
    """What a Lava run did: processes on neuro-cores and on the host (the plan's ``summary``), phases of its
    time, fixed-point counters (accumulator overflows and membrane saturations per neuron block, wraps per conv)."""
    t = result["timings"]
    return {"precision": precision, "lowering": summary["lowering"], "processes": summary["processes"],
            "neuro_core_processes": summary["neuro_core_processes"], "host_processes": summary["host_processes"],
            "host_ops": summary["host_ops"], "latency_steps": summary["latency_steps"],
            "steps_per_s": t["steps"] / t["run_s"] if t["run_s"] else None,
            "phases_s": {k: t[k] for k in ("build_s", "compile_s", "run_s", "stop_s", "wall_s")},
            "counts": result["counts"], "overflows": result["overflows"], "saturations": result["saturations"]}


class LavaBackend:
    """The ``lava`` backend of :mod:`sfn_deploy.backends`: a bundle written once, each batch streamed through
    Lava processes (``options``: precision, lowering, input_abs_max). The ANN has no Lava form (it runs on the
    reference)."""
    runs_ann = False
    one_stream = True
    writes_folder = True

    def runner(self, model: ConvertedModel, *, ann: bool = False, threads: int | None = None,
               options: dict | None = None) -> LavaRunner:
        return LavaRunner(model, **(options or {}))

    def layers(self, model: ConvertedModel, x, batch_size: int, options: dict | None = None) -> dict:
        """Levels and membrane potentials read from the neurons' taps (fixed point dequantised with the
        neuron's scale), with the run's counters and timings. In fixed point (graded), ``references`` holds the
        integer reference's (reference.py) on the same samples, for per-layer parity against it."""
        runner = LavaRunner(model, record=True, **(options or {}))
        y = runner(x).numpy()
        r = runner.result()
        pre = {k: v.astype(np.float64) * r["scales"].get(k, 1.0) for k, v in r["pre"].items()}
        out = {"outputs": y, "levels": {k: v.astype(np.int64) for k, v in r["levels"].items()}, "pre": pre,
               "counts": r["counts"], "timings": r["timings"]}
        if runner.precision == "fixed_pt" and runner.info["lowering"] == "graded":
            from .reference import integer_reference, run_reference
            with contextlib.suppress(UserError):     # a graph the reference does not model: no rows against it
                out["references"] = {"integer-reference": run_reference(integer_reference(model, runner.plan()), x,
                                                                        batch_size)}
        return out

    def split_time(self, runner: LavaRunner, seconds: float) -> tuple[float, float]:
        """The worker's start, Lava's compile and stop are set-up; the run is the stream."""
        run_s = runner.result()["timings"]["run_s"]
        return seconds - run_s, run_s

    def details(self, runner: LavaRunner, model: ConvertedModel, data, batch_size: int) -> dict:
        """The run's summary; in fixed point also the comparison with the integer reference (reference.py)."""
        out = {"lava": run_summary(runner.summary, runner.precision, runner.result())}
        if runner.precision == "fixed_pt" and runner.info["lowering"] == "graded":
            from .reference import compare_with_reference
            try:
                out["integer_reference"] = compare_with_reference(model, runner.plan(), data,
                                                                  runner.result()["outputs"], batch_size)
            except UserError as e:         # a graph the reference does not model: the run's figures still count
                out["integer_reference"] = {"unavailable": str(e)}
        return out

    def parity_info(self, options: dict | None) -> dict:
        return {"lava": {"precision": (options or {}).get("precision", "floating_pt"),
                         "lowering": (options or {}).get("lowering", "graded"),
                         "avg_pool": (options or {}).get("avg_pool", "folded")}}

    def export(self, model: ConvertedModel, path: str, *, lowering: str = "graded",
               input_abs_max: float | None = None, avg_pool: str = "folded", **_other) -> dict:
        return export_lava(model, path, lowering, input_abs_max, avg_pool)

    def describe_export(self, info: dict) -> str:
        text = (f"wrote {info['path']}/: Lava bundle ({info['lowering']} lowering; {', '.join(info['precisions'])}), "
                f"{info['processes']} processes ({info['neuro_core_processes']} on neuro-cores, "
                f"{info['host_processes']} on the host: {', '.join(info['host_ops']) or 'input/output only'}), "
                + (f"{info['pooling_layers']} pooling layers, " if info.get("pooling_layers") else "")
                + (f"{info['residual_sums']} residual sums on cores, " if info.get("residual_sums") else "")
                + f"latency {info['latency_steps']} steps, {info['bytes']:,} bytes")
        for p, why in info["missing"].items():
            text += f"\n  no {p} plan: {why}"
        return text

    def support(self, model: ConvertedModel) -> str:
        try:
            p = lower(model, "graded", "floating_pt").summary()
        except UserError as e:
            return f"refused: {e}"
        return (f"{p['processes']} processes ({p['neuro_core_processes']} neuro-core, {p['host_processes']} "
                f"host: {', '.join(p['host_ops']) or 'input/output only'}), latency {p['latency_steps']} steps")


BACKEND = LavaBackend()
