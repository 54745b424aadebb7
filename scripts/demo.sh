#!/usr/bin/env bash
# The built-in demo: the paper's comparison on scikit-learn's 8x8 digits, even digits normal, odd sensitive.
#   bash scripts/demo.sh [output folder]     (default: outputs/digits-benchmark)
# Trains an unsupervised and a PU diffusion model (seed 0, 2000 steps each), scores both with
# evaluate.py (non-sensitive rate, classifier FID) and prints the table. The two runs train side by side, each
# on its share of the cores (--jobs 2): a model this small gains nothing from a second thread.
# The full benchmark (three methods, oracle, three seeds) is `python benchmarks/paper_protocol.py`.
set -euo pipefail
PYTHON=${PYTHON:-python3}
OUTPUT_DIR=${1:-outputs/digits-benchmark}
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}

"$PYTHON" benchmarks/paper_protocol.py --quick --jobs 2 --output_dir "$OUTPUT_DIR"
echo "PU model: $OUTPUT_DIR/runs/pu-seed0   samples side by side: $OUTPUT_DIR/grids.png"
