"""Large tensors straight from the kernel (glibc ``mallopt``): flat peak memory over a long streamed run.

glibc raises its mmap threshold each time a large block is freed (up to 32 MB), after which the interpreter's
per-batch activations (tens of MB each for a ViT at 224×224) come from the heap, which fragments: the peak
resident set of ``evaluate`` on a ViT-S/16 at batch 64 grew from 3.7 GB on 1,000 photos to 6.1 GB on 10,000
(examples/bench_memory.py). With the threshold fixed at 1 MiB every such block is mapped and returned whole:
1.06 GB, flat over 6 passes of 1,000 photos, against 3.4 → 4.1 GB (docs/benchmarks.md, "Memory with streamed
photos"). The page faults of fresh mappings cost about as much as the ops that fill them: the interpreter
reuses the storage of the values it released within each batch (``simulators.interpreter.Buffers``).
``SFN_MALLOC=default`` keeps glibc's behaviour; other C libraries (macOS, musl) are left alone.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_MMAP_THRESHOLD = -3           # glibc's mallopt parameter numbers (malloc.h)
THRESHOLD = 1 << 20


def tune() -> bool:
    """Fix glibc's mmap threshold at :data:`THRESHOLD`; whether it was set."""
    if os.environ.get("SFN_MALLOC", "") == "default" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, THRESHOLD))
