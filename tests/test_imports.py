"""The package's import graph, read with ``ast`` (module-level and function-level imports, the folders
exporters/, simulators/, targets/ under their package names): the execution code has no import cycle,
and the simulators never reach up into conversion."""
from __future__ import annotations

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = {"sfn_deploy": "sfn_deploy", "sfn_deploy.exporters": "exporters", "sfn_deploy.simulators": "simulators",
            "sfn_deploy.targets": "targets"}
# modules of the execution path: the op table, the fire rule, the interpreter and its modes, and their callers
EXECUTION = {"sfn_deploy.ir", "sfn_deploy.ops", "sfn_deploy.neurons", "sfn_deploy.runtime", "sfn_deploy.firegrid",
             "sfn_deploy.mbe", "sfn_deploy.pmsm", "sfn_deploy.calibrate", "sfn_deploy.simulators.interpreter",
             "sfn_deploy.simulators.firegrid", "sfn_deploy.simulators.temporal", "sfn_deploy.simulators.counting"}
BASE = ("sfn_deploy.ir", "sfn_deploy.ops", "sfn_deploy.neurons")
ABOVE_SIMULATORS = ("sfn_deploy.convert", "sfn_deploy.calibrate", "sfn_deploy.tuning", "sfn_deploy.cli")


def modules() -> dict[str, str]:
    """module name -> file, for every .py file of the package's folders."""
    found = {}
    for pkg, folder in PACKAGES.items():
        top = os.path.join(ROOT, folder)
        for dirpath, dirnames, files in os.walk(top):
            dirnames[:] = [d for d in dirnames if d != "__pycache__"]
            rel = os.path.relpath(dirpath, top)
            base = pkg if rel == "." else pkg + "." + rel.replace(os.sep, ".")
            for f in files:
                if f.endswith(".py"):
                    found[base if f == "__init__.py" else f"{base}.{f[:-3]}"] = os.path.join(dirpath, f)
    return found


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        package = mod if path.endswith("__init__.py") else mod.rpartition(".")[0]
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        for node in ast.walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[:len(parts) - node.level + 1])
                    origin = f"{base}.{node.module}" if node.module else base
                else:
                    origin = node.module or ""
                targets = [f"{origin}.{a.name}" if f"{origin}.{a.name}" in mods else origin for a in node.names]
            for t in targets:
                while t and t not in mods:
                    t = t.rpartition(".")[0]
                if t and t != mod:
                    graph[mod].add(t)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def reaches(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for w in graph[todo.pop()]:
            if w not in seen:
                seen.add(w)
                todo.append(w)
    return seen


def test_execution_code_has_no_import_cycle():
    bad = [c for c in cycles(import_graph()) if EXECUTION & set(c)]
    assert not bad, f"import cycles through the execution code: {bad}"


def test_base_modules_import_nothing_above_them():
    g = import_graph()
    for mod in BASE:
        assert reaches(g, mod) <= set(BASE), f"{mod} imports {sorted(reaches(g, mod) - set(BASE))}"


def test_simulators_never_import_conversion():
    g = import_graph()
    for mod in g:
        if mod.startswith("sfn_deploy.simulators"):
            up = sorted(m for m in reaches(g, mod) if m.startswith(ABOVE_SIMULATORS))
            assert not up, f"{mod} imports {up}"


if __name__ == "__main__":
    for c in cycles(import_graph()):
        print(" <-> ".join(c))
