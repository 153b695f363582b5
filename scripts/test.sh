#!/usr/bin/env bash
# Install into .venv (if needed), check lint, formatting and the import layers, then run the test
# suite. Extra arguments go to pytest (e.g. -m "not slow" for the quick loop, -k NAME, -x).
source "$(dirname "$0")/_env.sh"
ruff check --quiet . && echo "ruff check: passed"
ruff format --check --quiet . && echo "ruff format --check: passed"
if ! layers=$(lint-imports --no-cache 2>&1); then
  echo "$layers" >&2
  exit 1
fi
echo "lint-imports: $(echo "$layers" | tail -n 1)"
python -m pytest -q "$@"
