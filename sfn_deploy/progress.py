"""Progress bars for long work: shown on a terminal, silent under --json or when asked."""
from __future__ import annotations

import sys

from tqdm import tqdm


def progress(iterable, desc: str, quiet: bool = False, total: int | None = None):
    disable = quiet or not sys.stderr.isatty()
    return tqdm(iterable, desc=desc, total=total, disable=disable, leave=False, file=sys.stderr)
