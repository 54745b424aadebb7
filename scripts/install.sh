#!/usr/bin/env bash
# Install what the project needs into the current Python environment.
#   bash scripts/install.sh [requirements file]   (default: requirements.txt)
# then the project itself, editable (pip install -e .), so that pu_diffusion imports from anywhere.
# torch comes first and on its own: an existing torch is kept; on a machine without an
# NVIDIA GPU the CPU wheel is taken, because PyPI's Linux wheel bundles CUDA (several GB).
set -euo pipefail
PYTHON=${PYTHON:-python3}
REQUIREMENTS=${1:-requirements.txt}
cd "$(dirname "$0")/.."

if "$PYTHON" -c "import torch" 2>/dev/null; then
  echo "keeping torch $("$PYTHON" -c 'import torch; print(torch.__version__)')"
elif command -v nvidia-smi >/dev/null 2>&1; then
  "$PYTHON" -m pip install "torch>=2.4"
else
  # --retries 0: where that index cannot be reached, pip falls back to the other indexes at once
  # instead of retrying for every one of torch's dependencies.
  "$PYTHON" -m pip install "torch==2.13.0" --retries 0 --extra-index-url https://download.pytorch.org/whl/cpu
fi
"$PYTHON" -m pip install -r "$REQUIREMENTS"
# --no-deps: the requirements above are its dependencies (pyproject.toml reads requirements.txt).
"$PYTHON" -m pip install --no-deps -e .
