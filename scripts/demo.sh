#!/usr/bin/env bash
# The README's demo: install everything, start two local ZooKeepers ("dc-us" and "dc-eu") and a
# Prefect server, seed a sample tree, back it up encrypted, verify, restore into dc-eu, show it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
exec .venv/bin/python scripts/demo.py "$@"
