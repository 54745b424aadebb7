#!/usr/bin/env bash
# Create the clone's own virtual environment, so that `make` works on a Python that refuses
# `pip install` outside one (PEP 668: Debian 12+, Ubuntu 23.04+, Fedora, Homebrew).
#   bash scripts/make_venv.sh PYTHON VENV_DIR
set -euo pipefail
PYTHON=$1
VENV_DIR=$2

if ! command -v "$PYTHON" >/dev/null 2>&1; then
  echo "error: PYTHON=$PYTHON is not an interpreter on this machine; give one, e.g. make demo PYTHON=python3.11" >&2
  exit 1
fi
# Debian and Ubuntu ship the venv module without ensurepip (it is in python3-venv), and
# `python3 -m venv` then fails half-way with a long message: check first.
if ! "$PYTHON" -c "import venv, ensurepip" >/dev/null 2>&1; then
  version=$("$PYTHON" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
  echo "error: $PYTHON cannot create a virtual environment: its venv module (or ensurepip) is missing." >&2
  echo "       On Debian or Ubuntu: sudo apt install python3-venv (or python$version-venv), then run make again." >&2
  exit 1
fi
echo "creating the virtual environment $VENV_DIR with $PYTHON ($("$PYTHON" --version 2>&1))"
# A half-made environment would be taken as ready by the next call: remove it if creation fails.
if ! "$PYTHON" -m venv "$VENV_DIR"; then
  rm -rf "$VENV_DIR"
  echo "error: $PYTHON -m venv $VENV_DIR failed (see above)" >&2
  exit 1
fi
