"""Peak memory of `convert` (fixed λ) and `evaluate` on 1,000 and on 10,000 photos (issue 17: streamed data
must not grow with the number of images; docs/benchmarks.md, "Memory with streamed photos").

Each command runs as its own process through the real CLI; its peak is the largest proportional resident
set (PSS) of the process and its DataLoader workers together, sampled from /proc every 50 ms, and the
kernel's own peak RSS of the main process (``ru_maxrss`` from ``wait4``). The evaluations run first, on a
model calibrated on 64 photos (evaluate's memory does not depend on the calibration), then the converts;
rows are appended to the output (a JSON line each, after a line of settings) as they finish.
The photos are CIFAR-10 training JPEGs (32×32), which the
model's own preprocessing (timm's data config) resizes to 224×224; the model is timm's ViT-S/16 with random
weights (the figure is memory, not accuracy).

    python examples/bench_memory.py                       # 1,000 and 10,000 photos, about an hour on 2 cores
    python examples/bench_memory.py --counts 200 2000     # a quicker look
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CIFAR = os.path.join(ROOT, "..", "shared", "data", "cifar10", "train")
CLI = os.path.join(os.path.dirname(sys.executable), "sfn-deploy")


def photos(root: str, count: int, out: str) -> str:
    """A class-folder copy of the first count/10 photos of each of the 10 classes."""
    classes = sorted(os.listdir(root))
    per = count // len(classes)
    for c in classes:
        os.makedirs(os.path.join(out, c), exist_ok=True)
        for name in sorted(os.listdir(os.path.join(root, c)))[:per]:
            shutil.copyfile(os.path.join(root, c, name), os.path.join(out, c, name))
    return out


def _tree_rss(pid: int) -> int:
    """Proportional resident bytes (PSS: a page shared by k processes counts 1/k, so forked DataLoader workers
    are not counted twice) of a process and all its descendants, from /proc."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith("Pss:")) * 1024
            for tid in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{tid}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except (FileNotFoundError, ProcessLookupError, ValueError):
            continue
    return total


def peak(cmd: list[str]) -> dict:
    """Run cmd; its peak memory (tree, sampled; main process, kernel) and wall time."""
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    top = [0]
    done = threading.Event()

    def sample():
        while not done.is_set():
            top[0] = max(top[0], _tree_rss(proc.pid))
            time.sleep(0.05)
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    out_chunks: list[bytes] = []
    reader = threading.Thread(target=lambda: out_chunks.append(proc.stdout.read()), daemon=True)  # type: ignore
    reader.start()
    _, status, usage = os.wait4(proc.pid, 0)
    done.set()
    thread.join()
    reader.join()
    err = proc.stderr.read().decode()  # type: ignore[union-attr]
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({code}): {err.strip()[-2000:]}")
    return {"peak_tree_mb": round(top[0] / 2**20, 1), "peak_main_mb": round(usage.ru_maxrss / 1024, 1),
            "seconds": round(time.time() - t0, 1), "output": json.loads(b"".join(out_chunks))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--counts", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument("--model", default="timm:vit_small_patch16_224")
    ap.add_argument("--model-args", default="num_classes=10")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--photos", default=CIFAR, help="class folders of JPEGs (CIFAR-10's training images)")
    ap.add_argument("--out", default=os.path.join(HERE, "bench_memory_results.jsonl"))
    ap.add_argument("--only", choices=("convert", "evaluate"), default=None, help="measure one command only")
    args = ap.parse_args()
    rows = []
    meta = {"command": " ".join(sys.argv), "model": args.model, "model_args": args.model_args,
            "workers": args.workers, "batch_size": args.batch_size, "cpus": os.cpu_count()}
    with open(args.out, "a") as f:
        f.write(json.dumps({"meta": meta}) + "\n")

    def record(cmd: str, n: int, r: dict) -> None:
        o = r.pop("output")
        row = {"command": cmd, "photos": n, **r, "samples": o.get("samples")}
        rows.append(row)
        print(json.dumps(row), flush=True)
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")
    with tempfile.TemporaryDirectory() as tmp:
        counts = sorted(args.counts)
        folders = {n: photos(args.photos, n, os.path.join(tmp, f"photos{n}")) for n in counts}

        def flags(n: int) -> list[str]:
            return ["--data", folders[n], "--workers", str(args.workers), "--batch-size", str(args.batch_size),
                    "--json"]

        def convert(n: int, *extra: str) -> dict:
            return peak([CLI, "convert", args.model, "--model-args", args.model_args, "--scale", "0.2", "-o",
                         os.path.join(tmp, f"m{n}.sfn.pt"), *flags(n), *extra])
        # evaluate's model: calibrated on the first 64 photos (its memory does not depend on the calibration)
        if args.only != "convert":
            convert(counts[0], "--calib-limit", "64")
            for n in counts:
                record("evaluate", n, peak([CLI, "evaluate", os.path.join(tmp, f"m{counts[0]}.sfn.pt"), *flags(n)]))
        if args.only != "evaluate":
            for n in counts:            # calibration reads every photo: the 10,000-photo convert is the long one
                record("convert", n, convert(n))
    for cmd in ("convert", "evaluate"):
        mine = [r for r in rows if r["command"] == cmd]
        if not mine:
            continue
        for key in ("peak_tree_mb", "peak_main_mb"):
            lo, hi = min(r[key] for r in mine), max(r[key] for r in mine)
            print(f"{cmd}: {key} {lo:.0f}–{hi:.0f} MB, largest/smallest {hi / lo:.3f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
