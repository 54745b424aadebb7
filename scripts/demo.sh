#!/usr/bin/env bash
# The built-in demo: PU diffusion on scikit-learn's 8x8 digits, even digits normal, odd sensitive.
#   bash scripts/demo.sh [output folder]     (default: outputs/digits-pu)
# U = every even digit of the train split + a tenth as many odd ones (the paper's 10:1),
# S = as many other odd digits; about 5 minutes on 2 CPU cores.
set -euo pipefail
PYTHON=${PYTHON:-python3}
OUTPUT_DIR=${1:-outputs/digits-pu}
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}

[ -f data/digits/data/train-00000-of-00001.parquet ] || "$PYTHON" prepare_digits.py --output_dir data/digits

"$PYTHON" -m accelerate.commands.launch --num_processes 1 --num_machines 1 --mixed_precision no \
  --dynamo_backend no train_pu_unconditional.py \
  --dataset_name data/digits --label_column label --sensitive_labels 1 3 5 7 9 \
  --loss_type pu --prior 0.1 --nonnegative nnpu \
  --resolution 8 --train_batch_size 128 --max_train_steps 2000 \
  --learning_rate 1e-3 --lr_warmup_steps 100 --use_ema --ema_max_decay 0.995 \
  --checkpointing_steps 1000 --save_images_epochs 1000 --save_model_epochs 1000 \
  --eval_batch_size 64 --seed 0 --output_dir "$OUTPUT_DIR" --overwrite_output_dir

echo "model: $OUTPUT_DIR   samples: $OUTPUT_DIR/samples.png   logs: tensorboard --logdir $OUTPUT_DIR/logs"
