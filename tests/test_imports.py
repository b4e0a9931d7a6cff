"""The layering of the execution code, on the import graph that .ci/import_cycles.py reads with ``ast``
(module-level and function-level imports, exporters/ and simulators/ under their package names):
no cycle through the execution code, the base modules import nothing above them, and the simulators
never reach up into conversion, calibration, tuning or the CLI."""
from __future__ import annotations

import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the op table, the fire rule, the interpreter and its modes, and the modules that run them
EXECUTION = {"sfn_deploy.ir", "sfn_deploy.ops", "sfn_deploy.neurons", "sfn_deploy.mbe", "sfn_deploy.pmsm",
             "sfn_deploy.calibrate", "sfn_deploy.simulators.interpreter", "sfn_deploy.simulators.firegrid",
             "sfn_deploy.simulators.temporal", "sfn_deploy.simulators.counting"}
BASE = {"sfn_deploy.ir", "sfn_deploy.ops", "sfn_deploy.neurons"}
ABOVE_SIMULATORS = ("sfn_deploy.convert", "sfn_deploy.calibrate", "sfn_deploy.tuning", "sfn_deploy.cli")


@pytest.fixture(scope="module")
def cycles_tool():
    path = os.path.join(ROOT, ".ci", "import_cycles.py")
    if not os.path.exists(path):
        pytest.skip(".ci/import_cycles.py not found")
    spec = importlib.util.spec_from_file_location("import_cycles", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


@pytest.fixture(scope="module")
def graph(cycles_tool) -> dict[str, set[str]]:
    return {m: set(to) for m, to in cycles_tool.edges(cycles_tool.modules(ROOT), ROOT).items()}


def _reaches(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for w in graph[todo.pop()]:
            if w not in seen:
                seen.add(w)
                todo.append(w)
    return seen


def test_execution_code_has_no_import_cycle(cycles_tool, graph):
    bad = [c for c in cycles_tool.cycles({m: dict.fromkeys(to) for m, to in graph.items()}) if EXECUTION & set(c)]
    assert not bad, f"import cycles through the execution code: {bad}"


def test_base_modules_import_nothing_above_them(graph):
    for mod in sorted(BASE):
        assert _reaches(graph, mod) <= BASE, f"{mod} imports {sorted(_reaches(graph, mod) - BASE)}"


def test_simulators_never_import_conversion(graph):
    for mod in sorted(graph):
        if mod.startswith("sfn_deploy.simulators"):
            up = sorted(m for m in _reaches(graph, mod)             # the module or its submodules (not "clips")
                        if any(m == a or m.startswith(a + ".") for a in ABOVE_SIMULATORS))
            assert not up, f"{mod} imports {up}"
