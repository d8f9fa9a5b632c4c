#!/bin/sh
# Build the kvroute wheel from a source tree and install it, with its dependencies and the
# given extras, into a new virtual environment:
#
#   sh docker/install.sh SRC VENV [EXTRAS]      e.g. sh docker/install.sh /src /opt/venv k8s
#
# The image's builder stage runs exactly this (see Dockerfile), and tests/packaging runs it
# against a bare venv, so what the tests check is what the image ships. $PYTHON (default
# python3) builds the wheel and creates the venv. It builds in SRC (leaving SRC/build):
# give it a copy of the sources, not a working tree.
set -eu
src=$1
venv=$2
extras=${3-}
python=${PYTHON:-python3}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

"$python" -m pip wheel --no-deps --wheel-dir "$work/dist" "$src"
"$python" -m venv "$venv"
set -- "$work"/dist/kvroute-*.whl
wheel=$1
# Dependencies as binaries only: nothing is compiled (the final stage has no compiler).
"$venv/bin/python" -m pip install --only-binary :all: "$wheel${extras:+[$extras]}"
"$venv/bin/kvroute" --help >/dev/null
