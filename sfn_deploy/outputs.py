"""Output paths are checked before any work starts: no output may resolve to an input of the same
command (symlinks, ``./``, hard links), and nothing but a regular file (or a Lava bundle folder) is
ever written over. The write itself is atomic (``model_file.atomic_write``, ``lava.bundle``).
"""
from __future__ import annotations

import os
import stat

from .errors import UserError
from .untrusted import file_kind


def _same(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def _inside(path: str, folder: str) -> bool:
    folder = os.path.realpath(folder)
    return os.path.realpath(path).startswith(folder.rstrip(os.sep) + os.sep)


def check_output(output: str, inputs: list[str | None], option: str = "-o", folder: bool = False) -> None:
    """Refuse an output that is an input, holds an input (a folder output), or exists as anything other than a
    regular file (or, with ``folder``, a folder); its parent folder must exist."""
    if not output:
        raise UserError(f"{option}: empty path")
    try:
        st = os.stat(output)
    except FileNotFoundError:
        st = None
    except OSError as e:
        raise UserError(f"{output}: cannot use as output ({e.strerror})") from e
    if st is not None:
        if stat.S_ISDIR(st.st_mode) and not folder:
            raise UserError(f"{output}: is a folder; {option} needs a file path")
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
            raise UserError(f"{output}: exists and is {file_kind(st.st_mode)}, not a regular file; refusing to "
                            "write over it")
    parent = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(parent):
        raise UserError(f"{output}: output folder {parent} does not exist")
    for path in inputs:          # a path not yet there (a study database) is compared by name
        if not path:
            continue
        if _same(output, path):
            raise UserError(f"{output}: {option} is the input {path}; writing it would destroy the input")
        if folder and _inside(path, output):
            raise UserError(f"{output}: {option} is a folder holding the input {path}; replacing it would "
                            "destroy the input")
