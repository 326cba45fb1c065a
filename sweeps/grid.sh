#!/usr/bin/env bash
# Queue a grid of DVC experiments for one model (backbone x image size x mask mode), run the
# queue, and print the results best test macro-F1 first. Each point retrains only that model.
#
#   bash sweeps/grid.sh
#   MODEL=mobilenet_attention BACKBONES=mobilenetv2_100,mobilenetv3_large_100 SIZES=128,192 \
#     MODES=crop,none bash sweeps/grid.sh
#   dvc exp branch <experiment> best-model     # then promote the winner to a branch
#
# Comma-separated values make DVC queue one experiment per combination. Offline, only the
# efficientnet_lite0/1/2 backbones have ImageNet weights (pretrained: true fails for others).
set -euo pipefail
model="${MODEL:-efficientnet_lite0_attention}"
dvc exp run --queue "evaluate@${model}" \
  -S "models.${model}.backbone=${BACKBONES:-efficientnet_lite0}" \
  -S "models.${model}.image_size=${SIZES:-128,160}" \
  -S "train.mask_mode=${MODES:-crop,none}"
dvc exp run --run-all --jobs "${JOBS:-1}"
dvc exp show --sort-by "metrics/${model}/eval.json:macro_f1" --sort-order desc --only-changed \
  --md
