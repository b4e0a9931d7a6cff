#!/usr/bin/env bash
# Create .venv (Python 3.10: lava-nc needs it) and install sfn-deploy with its test tools, once.
# Sourced by examples/demo.sh and tests/run.sh (the README's two commands); reinstalls only when pyproject.toml or
# requirements.lock changes. Versions come from requirements.lock (exact, used as pip constraints), so two fresh clones
# get the same packages; regenerate it with `bash .ci/lock` after changing a dependency in pyproject.toml.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="$ROOT/.venv"
STAMP="$VENV/.sfn-deploy-installed"
want="$(cat "$ROOT/pyproject.toml" "$ROOT/requirements.lock" | sha256sum | cut -d' ' -f1)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$want" ]; then
  if [ ! -x "$VENV/bin/python" ]; then
    PY=""
    for cand in "python3.10" "$HOME/.pyenv/versions/3.10.13/bin/python3.10"; do
      if PYENV_VERSION=3.10.13 "$cand" -c 'import sys; assert sys.version_info[:2] == (3, 10)' 2>/dev/null; then
        PY="$cand"; break
      fi
    done
    if [ -z "$PY" ]; then
      echo "error: Python 3.10 is required (lava-nc does not support newer versions); install it, e.g. 'pyenv install 3.10.13'" >&2
      exit 2
    fi
    echo "creating $VENV with $PY" >&2
    PYENV_VERSION=3.10.13 "$PY" -m venv "$VENV"
  fi
  echo "installing sfn-deploy and its dependencies into .venv (first time: a few minutes)" >&2
  "$VENV/bin/python" -m pip install -q --upgrade pip >&2
  "$VENV/bin/python" -m pip install -q -c "$ROOT/requirements.lock" -e "$ROOT[test]" >&2
  echo "$want" > "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
