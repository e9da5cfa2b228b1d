#!/usr/bin/env bash
# Install what the tests need into .venv and run every check: ruff, mypy, then the whole test suite.
# Extra arguments go to pytest. Exits non-zero on any failure, and when no test ran (pytest exit 5).
set -euo pipefail
cd "$(dirname "$0")/.."
# The Redis tests run against a real redis-server from the distribution's packages; without it the
# run fails (it never skips them).
if ! command -v redis-server >/dev/null 2>&1; then
    echo "installing redis-server (Debian package) for the Redis tests" >&2
    sudo=""
    [ "$(id -u)" = 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends redis-server >/dev/null
fi
# The audit log's cross-language check runs the Node.js verifier (scripts/verify-audit.mjs); without
# node the run fails (it never skips it).
if ! command -v node >/dev/null 2>&1; then
    echo "installing nodejs (Debian package) for the audit verifier tests" >&2
    sudo=""
    [ "$(id -u)" = 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends nodejs >/dev/null
fi
# The dashboard's browser tests drive Debian's chromium through Playwright (Playwright's own browser
# download is not used); without it the run fails (it never skips them).
if ! command -v chromium >/dev/null 2>&1; then
    echo "installing chromium (Debian package) for the dashboard's browser tests" >&2
    sudo=""
    [ "$(id -u)" = 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends chromium >/dev/null
fi
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
.venv/bin/ruff check src tests bench scripts
.venv/bin/mypy
.venv/bin/python -m pytest "$@"
