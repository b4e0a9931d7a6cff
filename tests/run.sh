#!/usr/bin/env bash
# The README's test command: set up .venv if needed, then run the test suite.
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
exit "$rc"
