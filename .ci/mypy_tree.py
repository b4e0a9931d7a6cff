"""Lay out the package as mypy must see it: a folder ``sfn_deploy`` holding links to sfn_deploy/'s entries and to
the folders of pyproject.toml's package-dir mapping (sfn_deploy.exporters -> exporters/, sfn_deploy.targets ->
targets/, sfn_deploy.simulators -> simulators/), under .mypy-tree/ (git-ignored). mypy has no package-dir mapping of
its own; [tool.mypy] in pyproject.toml sets mypy_path to this folder, so `mypy` checks the real files under their
import names. Rebuilt on every run (links only: cheap), so new modules are seen."""
from __future__ import annotations

import os
import shutil
import sys

import tomli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TREE = os.path.join(ROOT, ".mypy-tree")


def package_dirs(root: str = ROOT) -> dict[str, str]:
    """pyproject.toml's [tool.setuptools.package-dir]: package name -> folder relative to the root."""
    with open(os.path.join(root, "pyproject.toml"), "rb") as f:
        return dict(tomli.load(f)["tool"]["setuptools"]["package-dir"])


def build(root: str = ROOT, tree: str = TREE) -> None:
    mapping = package_dirs(root)
    top = "sfn_deploy"
    shutil.rmtree(tree, ignore_errors=True)
    pkg = os.path.join(tree, top)
    os.makedirs(pkg)
    with open(os.path.join(tree, ".gitignore"), "w") as f:
        f.write("*\n")
    src = os.path.join(root, mapping.get(top, top))
    for entry in sorted(os.listdir(src)):
        if entry != "__pycache__":
            os.symlink(os.path.join(src, entry), os.path.join(pkg, entry))
    for name, folder in mapping.items():
        if name == top:
            continue
        parts = name.split(".")
        if parts[0] != top or len(parts) != 2:
            sys.exit(f"mypy_tree: cannot lay out package-dir entry {name!r} (only {top}.<name> is supported)")
        link = os.path.join(pkg, parts[1])
        if os.path.lexists(link):
            sys.exit(f"mypy_tree: {mapping.get(top, top)}/{parts[1]} clashes with the mapped package {name}")
        os.symlink(os.path.join(root, folder), link)


if __name__ == "__main__":
    build()
