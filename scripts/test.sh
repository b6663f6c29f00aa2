#!/usr/bin/env bash
# The README's test command: install everything (system packages included), lint, test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
.venv/bin/ruff check .
# Three test processes (pytest-xdist), each with its own session servers, a test file at a time
# so module fixtures (two Prefect workers, a seeded store) are built once. Three on two cores: the
# point-in-time files spend minutes in 60 s writer runs and lock leases with the CPU idle, and a
# third process runs other files meanwhile (545 tests: 15 min 53 s, against 17 min 55 s with two,
# bench/RESULTS.md). `-n 0` (BURROW_TEST_WORKERS=0) runs serially.
# --no-loadscope-reorder: the files go out in the order tests/conftest.py gives them (the
# longest first), not xdist's default of the most tests first, which sent the few-test files
# that take minutes (the fleet, the worker stops) last, one worker busy with them and the other
# idle. --durations=25: every run shows where the time went. A test's `burrow` run is forked from
# one process per test process that imported Prefect once (tests/clifork.py, a second of CPU saved
# per run); BURROW_TEST_FORK=0 runs each as the real console script instead.
exec .venv/bin/python -m pytest -q -p no:cacheprovider -n "${BURROW_TEST_WORKERS:-3}" --dist loadfile \
  --no-loadscope-reorder --durations=25 "$@"
