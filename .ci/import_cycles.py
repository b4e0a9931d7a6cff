"""Fail on import cycles inside sfn_deploy (exit 1, listing each cycle; exit 0 when there are none).

Every module of the package is parsed with ``ast`` (nothing is imported): module-level imports and imports inside
functions alike, relative imports resolved, and pyproject.toml's package-dir mapping applied (sfn_deploy.exporters
lives in exporters/, and so on). Imports under ``if TYPE_CHECKING:`` are skipped (they never run). An edge goes to
the most specific module an import names: ``from .a import b`` is an edge to ``a.b`` when that is a module, else to
``a``. Each cycle is printed once, as the shortest cycle through one of its edges, with the import's file:line.

    python .ci/import_cycles.py [--graph] [--root DIR]   (--graph: print every edge; --root: another checkout)
"""
from __future__ import annotations

import ast
import os
import sys
from collections import deque

import tomli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOP = "sfn_deploy"


def modules(root: str = ROOT) -> dict[str, str]:
    """Module name -> file path (relative to root), for the package and its mapped subpackages."""
    with open(os.path.join(root, "pyproject.toml"), "rb") as f:
        mapping = tomli.load(f)["tool"]["setuptools"]["package-dir"]
    found: dict[str, str] = {}
    for pkg, folder in sorted(mapping.items()):
        base = os.path.join(root, folder)
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = sorted(d for d in dirnames if os.path.exists(os.path.join(dirpath, d, "__init__.py")))
            rel = os.path.relpath(dirpath, base)
            prefix = pkg if rel == "." else pkg + "." + rel.replace(os.sep, ".")
            for fn in sorted(filenames):
                if fn.endswith(".py"):
                    name = prefix if fn == "__init__.py" else f"{prefix}.{fn[:-3]}"
                    found.setdefault(name, os.path.relpath(os.path.join(dirpath, fn), root))
    return found


def _type_checking_only(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST):
    """Every Import/ImportFrom node, skipping the bodies of ``if TYPE_CHECKING:``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        children = list(ast.iter_child_nodes(node))
        if isinstance(node, ast.If) and _type_checking_only(node):
            children = list(node.orelse)
        stack.extend(children)


def edges(mods: dict[str, str], root: str = ROOT) -> dict[str, dict[str, int]]:
    """module -> {imported module inside the package: first line that imports it}."""
    out: dict[str, dict[str, int]] = {m: {} for m in mods}
    for mod, path in mods.items():
        is_pkg = path.endswith("__init__.py")
        with open(os.path.join(root, path), encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        for node in _imports(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                if node.level:
                    parts = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    parts = parts[:len(parts) - (node.level - 1)]
                    base = ".".join(parts + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            for t in targets:
                while t and t not in mods:  # `import sfn_deploy.x.y` names y; a name inside a module names it
                    t = t.rpartition(".")[0]
                if t and t != mod:
                    out[mod].setdefault(t, node.lineno)
    return out


def _sccs(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on: set[str] = set()
    stack: list[str] = []
    result: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on.add(start)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    result.append(sorted(comp))
    return sorted(result)


def _shortest_path(graph: dict[str, dict[str, int]], src: str, dst: str, allowed: set[str]) -> list[str]:
    prev: dict[str, str] = {}
    queue = deque([src])
    seen = {src}
    while queue:
        v = queue.popleft()
        if v == dst:
            path = [v]
            while path[-1] != src:
                path.append(prev[path[-1]])
            return path[::-1]
        for w in sorted(graph[v]):
            if w in allowed and w not in seen:
                seen.add(w)
                prev[w] = v
                queue.append(w)
    return []


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """One shortest cycle through each edge that lies on a cycle, each cycle once (rotation removed)."""
    found: dict[tuple[str, ...], list[str]] = {}
    for comp in _sccs(graph):
        members = set(comp)
        for u in comp:
            for v in sorted(graph[u]):
                if v in members:
                    cyc = [u] + _shortest_path(graph, v, u, members)[:-1]
                    i = cyc.index(min(cyc))
                    key = tuple(cyc[i:] + cyc[:i])
                    found.setdefault(key, list(key))
    return sorted(found.values(), key=lambda c: (len(c), c))


def main(argv: list[str]) -> int:
    root = argv[argv.index("--root") + 1] if "--root" in argv else ROOT
    mods = modules(root)
    graph = edges(mods, root)
    if "--graph" in argv:
        for m in sorted(graph):
            for t, line in sorted(graph[m].items()):
                print(f"{m} -> {t}  ({mods[m]}:{line})")
    found = cycles(graph)
    if not found:
        print(f"import cycles: none ({len(mods)} modules, {sum(map(len, graph.values()))} imports)")
        return 0
    print(f"import cycles: {len(found)} in {len(_sccs(graph))} group(s) of modules that import each other")
    for cyc in found:
        steps = [f"{a} -> {b} ({mods[a]}:{graph[a][b]})" for a, b in zip(cyc, cyc[1:] + cyc[:1], strict=True)]
        print("  " + " => ".join(m.removeprefix(TOP + ".") for m in cyc + cyc[:1]))
        for s in steps:
            print("      " + s)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
