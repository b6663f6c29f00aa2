#!/usr/bin/env bash
# Run a command with CPU-bound load beside it, as CI's busy 2-core machines have:
#
#     bash scripts/stress.sh [-j N] [-r RUNS] -- bash scripts/test.sh
#
# N busy processes (default 2) spin for as long as the command runs; the command is run RUNS
# times in a row (default 1) and the script stops at the first failure. Each run's wall time
# and the load average are printed, to go into bench/RESULTS.md. The busy processes are
# plain `python -c` loops, so nothing beyond the project's Python is needed.
set -euo pipefail
cd "$(dirname "$0")/.."
jobs=2
runs=1
while [[ $# -gt 0 ]]; do
  case "$1" in
    -j) jobs="$2"; shift 2 ;;
    -r) runs="$2"; shift 2 ;;
    --) shift; break ;;
    *) break ;;
  esac
done
[[ $# -gt 0 ]] || { echo "usage: $0 [-j N] [-r RUNS] -- COMMAND..." >&2; exit 2; }
py=python3
[[ -x .venv/bin/python ]] && py=.venv/bin/python

pids=()
stop_load() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap stop_load EXIT
for _ in $(seq "$jobs"); do
  "$py" -c 'while True: pass' &
  pids+=("$!")
done

for i in $(seq "$runs"); do
  start=$(date +%s)
  echo "stress: run $i of $runs with $jobs busy processes beside it: $*" >&2
  if "$@"; then rc=0; else rc=$?; fi
  end=$(date +%s)
  echo "stress: run $i exit $rc after $((end - start)) s; load average $(cut -d' ' -f1-3 /proc/loadavg)" >&2
  [[ $rc -eq 0 ]] || exit "$rc"
done
