#!/usr/bin/env bash
# Install what the project needs into the current Python environment.
#   bash scripts/install.sh [requirements file]   (default: requirements.txt)
# then the project itself, editable, so that pu_diffusion imports from anywhere.
# torch comes first and on its own: an existing torch is kept; on a machine without an
# NVIDIA GPU the CPU wheel is taken, because PyPI's Linux wheel bundles CUDA (several GB).
# The rest goes in with uv where uv can be had (installed into the environment with pip, seconds
# instead of the two minutes pip takes on 2 cores), else with pip; INSTALLER=pip forces pip.
# uv reads no pip.conf: behind a private index set there, give UV_INDEX_URL or INSTALLER=pip.
set -euo pipefail
PYTHON=${PYTHON:-python3}
REQUIREMENTS=${1:-requirements.txt}
INSTALLER=${INSTALLER:-uv}
cd "$(dirname "$0")/.."

# Nothing is byte-compiled at install time: pip does it one file at a time (two thirds of its time on
# 2 cores), for every module of every package. Python compiles the modules a program imports the first
# time it imports them, a few seconds once.
pip_install() {
  "$PYTHON" -m pip install --no-compile "$@"
}

with_uv() {
  [ "$INSTALLER" = uv ] || return 1
  if ! "$PYTHON" -m uv --version >/dev/null 2>&1; then
    "$PYTHON" -m pip install --no-compile --quiet --retries 0 uv >/dev/null 2>&1 || return 1
  fi
  # --python: the environment of $PYTHON, as pip would install into, and the torch already there is kept.
  "$PYTHON" -m uv pip install --python "$PYTHON" "$@"
}

install() {
  with_uv "$@" || {
    [ "$INSTALLER" = uv ] && echo "uv was not available or failed: installing with pip"
    pip_install "$@"
  }
}

if "$PYTHON" -c "import torch" 2>/dev/null; then
  echo "keeping torch $("$PYTHON" -c 'import torch; print(torch.__version__)')"
elif command -v nvidia-smi >/dev/null 2>&1; then
  pip_install "torch>=2.4"
else
  # --retries 0: where that index cannot be reached, pip falls back to the other indexes at once
  # instead of retrying for every one of torch's dependencies. torch goes in with pip, which also
  # finds a wheel that lies on this machine's disk (pip.conf's find-links), where uv would download.
  pip_install "torch==2.13.0" --retries 0 --extra-index-url https://download.pytorch.org/whl/cpu
fi
install -r "$REQUIREMENTS"
# --no-deps: the requirements above are its dependencies (pyproject.toml reads requirements.txt).
install --no-deps -e .
