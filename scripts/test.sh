#!/usr/bin/env bash
# Install what the tests need into .venv and run every check: ruff, mypy, then the whole test suite.
# Extra arguments go to pytest. Exits non-zero on any failure, and when no test ran (pytest exit 5).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
.venv/bin/ruff check src tests bench scripts
.venv/bin/mypy
.venv/bin/python -m pytest "$@"
