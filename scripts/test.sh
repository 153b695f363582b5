#!/usr/bin/env bash
# Install into .venv (if needed) and run the test suite. Extra arguments go to pytest.
source "$(dirname "$0")/_env.sh"
python -m pytest -q "$@"
