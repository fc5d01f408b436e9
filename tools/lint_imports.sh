#!/usr/bin/env bash
# The layer contracts of .importlinter (issue 19): fails on any new upward import between lmtrain's
# layers. Uses the repository's .venv (tools/test.sh creates it) or the lint-imports on PATH.
#   tools/lint_imports.sh            # exit 0: contracts kept; 1: a contract is broken
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -x .venv/bin/lint-imports ]; then
  LINT=.venv/bin/lint-imports
elif command -v lint-imports >/dev/null; then
  LINT=lint-imports
else
  echo "lint-imports not found: pip install -e '.[dev]' (import-linter is a dev dependency)" >&2
  exit 2
fi
# Analyse this checkout's lmtrain, not an installed copy.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$LINT" --no-cache .importlinter
