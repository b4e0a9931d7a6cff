"""The checks .ci/lint runs besides ruff and mypy: import cycles and the setuptools packages list."""
import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYPROJECT = """
[tool.setuptools]
packages = {packages}
[tool.setuptools.package-dir]
"sfn_deploy" = "sfn_deploy"
"sfn_deploy.exporters" = "exporters"
"""


def _tree(tmp_path, files: dict, packages: list) -> str:
    (tmp_path / "pyproject.toml").write_text(PYPROJECT.format(packages=repr(packages).replace("'", '"')))
    for rel, text in files.items():
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(textwrap.dedent(text))
    return str(tmp_path)


def _cycles(root: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, os.path.join(ROOT, ".ci", "import_cycles.py"), "--root", root],
                          capture_output=True, text=True, timeout=60)


def test_a_cycle_through_the_mapped_folder_and_a_function_level_import_is_found(tmp_path):
    root = _tree(tmp_path, {
        "sfn_deploy/__init__.py": "",
        "sfn_deploy/a.py": "from .exporters import b\n",
        "exporters/__init__.py": "",
        "exporters/b.py": "def f():\n    from ..a import x\n",             # function level, relative, mapped
        "sfn_deploy/c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import a\n",
    }, ["sfn_deploy", "sfn_deploy.exporters"])
    r = _cycles(root)
    assert r.returncode == 1, r.stdout
    assert "a => exporters.b => a" in r.stdout
    assert "exporters/b.py:2" in r.stdout
    assert "c =>" not in r.stdout                                           # TYPE_CHECKING imports never run


def test_no_cycle_exits_0(tmp_path):
    root = _tree(tmp_path, {"sfn_deploy/__init__.py": "from . import a\n", "sfn_deploy/a.py": "import os\n",
                            "exporters/__init__.py": "from sfn_deploy import a\n"},
                 ["sfn_deploy", "sfn_deploy.exporters"])
    r = _cycles(root)
    assert r.returncode == 0 and "none" in r.stdout, r.stdout


def test_the_project_has_no_import_cycle_tool_errors():
    r = _cycles(ROOT)
    assert r.returncode in (0, 1) and r.stderr == "", r.stderr              # parses every module of the package
