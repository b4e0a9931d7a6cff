#!/usr/bin/env bash
# The README's test command: set up .venv if needed, run the test suite, then the lint and type checks
# (.ci/lint: ruff, mypy, import cycles, the package list). Either failing fails the run.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/bootstrap.sh" || exit $?
set +e
cd "$ROOT"
python -m pytest -q "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "error: pytest collected no tests" >&2
  exit 1
fi
bash "$ROOT/.ci/lint" >&2 || { [ "$rc" -ne 0 ] || rc=1; }
exit "$rc"
