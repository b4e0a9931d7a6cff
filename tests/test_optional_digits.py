"""scikit-learn is optional (the extra ``sfn-deploy[digits]``): without it, ``sklearn:digits`` is a one-line
UserError (exit 2) naming the install command, and everything else still imports."""
import os
import subprocess
import sys

import pytest

from sfn_deploy.data import DIGITS_INSTALL, load_data
from sfn_deploy.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Hides scikit-learn from a fresh interpreter (None in sys.modules: importing it raises ModuleNotFoundError).
NO_SKLEARN = "import sys; sys.modules['sklearn'] = sys.modules['sklearn.datasets'] = None; "


def test_missing_scikit_learn_is_a_user_error_naming_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(UserError, match="sfn-deploy\\[digits\\]"):
        load_data("sklearn:digits")


def test_cli_without_scikit_learn_exits_2_with_one_line(tmp_path):
    code = NO_SKLEARN + "from sfn_deploy.cli import main; sys.argv[0] = 'sfn-deploy'; main()"
    model = os.path.join(ROOT, "examples", "models", "digits_mlp.pt2")
    r = subprocess.run([sys.executable, "-c", code, "convert", model, "--data", "sklearn:digits",
                        "-o", str(tmp_path / "out.sfn.pt"), "--scale", "0.3"],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and DIGITS_INSTALL in lines[0], r.stderr
    assert not (tmp_path / "out.sfn.pt").exists()


def test_the_package_imports_without_scikit_learn():
    code = NO_SKLEARN + ("import sfn_deploy.cli, sfn_deploy.data, sfn_deploy.convert; "
                         "assert 'sklearn' not in [m for m in sys.modules if sys.modules[m] is not None]")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=300)
