"""One Lava simulation, run as ``python -m sfn_deploy.exporters.lava.worker JOB.json`` in its own
process group, so that the caller can kill it (and every process Lava forked) on a timeout: a Lava
run that fails can hang, and an interpreter that exits without ``stop()`` hangs too.

The worker re-reads the bundle (checksum and structure, :func:`.bundle.read_bundle`) before Lava is
imported and refuses one that is not the bundle its caller checked (``sha256`` in the job). A bundle
it refuses is reported as a user error (``user_error.txt``, exit code 2); anything else that fails
is an internal error (traceback, exit code 3). A bundle is data: JSON and ``allow_pickle=False``."""
from __future__ import annotations

import json
import logging
import os
import sys
import time

USER_ERROR = 2           # exit code: the bundle was refused; the message is in user_error.txt beside the job


def main(job_path: str) -> int:
    with open(job_path) as f:
        job = json.load(f)
    t0 = time.perf_counter()
    from ...errors import UserError
    from .bundle import read_bundle
    manifest, plans = read_bundle(job["bundle"], job["precision"])
    if manifest.get("sha256") != job["sha256"]:
        raise UserError(f"{job['bundle']}: the bundle changed after it was checked (checksum "
                        f"{manifest.get('sha256')}, checked {job['sha256']}); not run")
    plan = plans[job["precision"]]
    from lava.magma.core.run_conditions import RunSteps

    from .build import build
    from .procs.processes import NpySource
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
    from ...errors import UserError
    try:
        code = main(sys.argv[1])
    except UserError as e:              # a refused bundle: one line for the caller, no traceback
        with open(os.path.join(os.path.dirname(os.path.abspath(sys.argv[1])), "user_error.txt"), "w") as f:
            f.write(" ".join(str(e).split()))
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(USER_ERROR)
    except BaseException:
        # a failed Lava run cannot be stopped cleanly (stop() hangs, and so does a normal exit): report and leave
        # at once; the caller kills the group
        import traceback
        traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(3)
    sys.stdout.flush()
    os._exit(code)
