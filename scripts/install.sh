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

# pip byte-compiles what it installs one file at a time: two thirds of a fresh install's time on 2 cores.
# It is told not to, and where it installed anything, compileall does the same work on every core at the end.
PIP_LOG=$(mktemp)
trap 'rm -f "$PIP_LOG"' EXIT
pip_install() {
  "$PYTHON" -m pip install --no-compile "$@" | tee -a "$PIP_LOG"
}

if "$PYTHON" -c "import torch" 2>/dev/null; then
  echo "keeping torch $("$PYTHON" -c 'import torch; print(torch.__version__)')"
elif command -v nvidia-smi >/dev/null 2>&1; then
  pip_install "torch>=2.4"
else
  # --retries 0: where that index cannot be reached, pip falls back to the other indexes at once
  # instead of retrying for every one of torch's dependencies.
  pip_install "torch==2.13.0" --retries 0 --extra-index-url https://download.pytorch.org/whl/cpu
fi
pip_install -r "$REQUIREMENTS"
# --no-deps: the requirements above are its dependencies (pyproject.toml reads requirements.txt).
"$PYTHON" -m pip install --no-deps -e .
if grep -q "^Successfully installed" "$PIP_LOG"; then
  echo "byte-compiling the installed packages on every core"
  # Files already compiled are skipped. The exit status is ignored, as pip ignores it: packages ship files
  # for newer Pythons (torch's py312_intrinsics.py) that this interpreter cannot compile.
  "$PYTHON" -c "import sysconfig; print(sysconfig.get_path('purelib')); print(sysconfig.get_path('platlib'))" |
    sort -u | xargs "$PYTHON" -m compileall -qq -j 0 || true
fi
