"""One Lava simulation, run as ``python -m sfn_deploy.exporters.lava.worker JOB.json`` in its own
process group, so that the caller can kill it (and every process Lava forked) on a timeout: a Lava
run that fails can hang, and an interpreter that exits without ``stop()`` hangs too."""
from __future__ import annotations

import json
import logging
import os
import sys
import time


def main(job_path: str) -> int:
    with open(job_path) as f:
        job = json.load(f)
    t0 = time.perf_counter()
    from lava.magma.core.run_conditions import RunSteps

    from .build import build
    from .bundle import read_bundle
    from .procs.processes import NpySource
    _, plans = read_bundle(job["bundle"], job["precision"])
    plan = plans[job["precision"]]
    steps = job["steps"]
    net = build(plan, tap_dir=job["workdir"], steps=steps, record=job["record"], neuron=job.get("neuron", "sfn"))
    src = NpySource(path=job["input"], shape=plan.input_shape, name="source")
    src.s_out.connect(net.in_port)
    logging.getLogger().handlers.clear()          # every Lava process adds a root handler
    t1 = time.perf_counter()
    src.create_runtime(run_cfg=net.run_config())
    t2 = time.perf_counter()
    try:
        src.run(condition=RunSteps(num_steps=steps))
    except Exception:                    # Lava only logs the children's tracebacks: print them
        for actor in getattr(getattr(src.runtime, "_messaging_infrastructure", None), "actors", []):
            exc = getattr(actor, "exception", None)
            if exc is not None:
                print(f"in Lava process: {exc!r}\n{getattr(actor, 'trace', '') or ''}", file=sys.stderr)
        raise
    t3 = time.perf_counter()
    models = {name: p.model_class.__name__ for name, p in net.processes.items()}
    src.stop()
    t4 = time.perf_counter()
    with open(os.path.join(job["workdir"], "result.json"), "w") as f:
        json.dump({"build_s": t1 - t0, "compile_s": t2 - t1, "run_s": t3 - t2, "stop_s": t4 - t3, "steps": steps,
                   "models": models}, f)
    return 0


if __name__ == "__main__":
    try:
        code = main(sys.argv[1])
    except BaseException:               # a failed Lava run cannot be stopped cleanly (stop() hangs, and so does
        import traceback                # a normal exit): report and leave at once; the caller kills the group
        traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(3)
    sys.stdout.flush()
    os._exit(code)
