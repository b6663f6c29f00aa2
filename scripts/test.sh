#!/usr/bin/env bash
# The README's test command: install everything (system packages included), lint, test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
.venv/bin/ruff check .
# Two test processes (pytest-xdist), each with its own session servers, a test file at a time
# so module fixtures (two Prefect workers, a seeded store) are built once. `-n 0` runs serially.
exec .venv/bin/python -m pytest -q -p no:cacheprovider -n "${BURROW_TEST_WORKERS:-2}" --dist loadfile "$@"
