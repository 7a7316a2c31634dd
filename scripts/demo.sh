#!/usr/bin/env bash
# Set up a virtualenv and run the sqla-rebalance demo (no database server needed).
# Extra arguments go to the demo, e.g. scripts/demo.sh --duration 30
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q -U pip
.venv/bin/python -m pip install -q -e .
exec .venv/bin/sqla-rebalance demo "$@"
