#!/usr/bin/env bash
# Line coverage of mailer/ over the whole test suite, subprocesses included (`mailer` started by
# the tests counts too). Slower than the plain suite; on demand:  bash bench/coverage.sh [-k …]
set -euo pipefail
cd "$(dirname "$0")/.."
out="$PWD/test-output/coverage"
rm -rf "$out" && mkdir -p "$out"
export COVERAGE_FILE="$out/.coverage" COVERAGE_RCFILE="$PWD/pyproject.toml"
.venv/bin/coverage run -m pytest -q -p no:randomly "$@" || echo "pytest failed: coverage is partial"
.venv/bin/coverage combine -q
.venv/bin/coverage report --fail-under="${FAIL_UNDER:-95}"
