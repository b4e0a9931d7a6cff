"""Progress bars for long work: shown on a terminal, silent under --json, when asked, and on the ranks of a
torchrun job other than rank 0 (whose bar shows its own share)."""
from __future__ import annotations

import os
import sys

from tqdm import tqdm


def progress(iterable, desc: str, quiet: bool = False, total: int | None = None):
    disable = quiet or not sys.stderr.isatty() or os.environ.get("RANK", "0") != "0"
    return tqdm(iterable, desc=desc, total=total, disable=disable, leave=False, file=sys.stderr)
