#!/usr/bin/env bash
# Create .venv (Python 3.10: lava-nc needs it) and install sfn-deploy with its test tools, once.
# Sourced by examples/demo.sh and tests/run.sh (the README's two commands); reinstalls only when pyproject.toml or
# requirements.lock changes. Versions come from requirements.lock (exact, used as pip constraints), so two fresh clones
# get the same packages; regenerate it with `bash .ci/lock` after changing a dependency in pyproject.toml.
# Every step checks its own exit status: callers source this file as `source bootstrap.sh || exit`, and bash ignores
# `set -e` inside such a list, so a failed pip run would otherwise go on and stamp a half-installed .venv as done.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="$ROOT/.venv"
STAMP="$VENV/.sfn-deploy-installed"
want="$(cat "$ROOT/pyproject.toml" "$ROOT/requirements.lock" | sha256sum | cut -d' ' -f1)"

_sfn_install_failed() {
  local free
  free="$(df -Pk "$ROOT" | awk 'NR == 2 {printf "%.1f", $4 / 1048576}')"
  echo "error: installing into $VENV failed (pip's message is above); ${free} GB free on its disk, and a full" \
    "install takes about 7.5 GB on x86_64 (PyPI's torch is a CUDA build). Rerun after fixing; nothing is stamped" \
    "as installed until pip succeeds" >&2
}

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
      return 2 2>/dev/null || exit 2
    fi
    echo "creating $VENV with $PY" >&2
    PYENV_VERSION=3.10.13 "$PY" -m venv "$VENV" || { _sfn_install_failed; return 1 2>/dev/null || exit 1; }
  fi
  echo "installing sfn-deploy and its dependencies into .venv (first time: a few minutes)" >&2
  rm -f "$STAMP"
  if ! "$VENV/bin/python" -m pip install -q --upgrade pip >&2 \
    || ! "$VENV/bin/python" -m pip install -q -c "$ROOT/requirements.lock" -e "$ROOT[test]" >&2; then
    _sfn_install_failed
    return 1 2>/dev/null || exit 1
  fi
  echo "$want" > "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
