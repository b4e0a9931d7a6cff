"""Fail when pyproject.toml's explicit [tool.setuptools] packages list misses a package folder (one with
__init__.py) under sfn_deploy/ or the mapped folders, or names one that does not exist: an unlisted subpackage
still works in the editable install and the tests, but setuptools ships it in a wheel only as deprecated data."""
from __future__ import annotations

import os
import sys

import tomli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> int:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        tool = tomli.load(f)["tool"]["setuptools"]
    listed, mapping = set(tool["packages"]), tool["package-dir"]
    found = set()
    for pkg, folder in mapping.items():
        base = os.path.join(ROOT, folder)
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = [d for d in dirnames if d != "__pycache__"]
            if "__init__.py" in filenames:
                rel = os.path.relpath(dirpath, base)
                found.add(pkg if rel == "." else pkg + "." + rel.replace(os.sep, "."))
    missing, extra = sorted(found - listed), sorted(listed - found)
    for p in missing:
        print(f"pyproject.toml: package {p} is not in [tool.setuptools] packages")
    for p in extra:
        print(f"pyproject.toml: [tool.setuptools] packages names {p}, which has no folder with __init__.py")
    return 1 if missing or extra else 0


if __name__ == "__main__":
    sys.exit(main())
