#!/usr/bin/env bash
# Queue a grid of experiments (backbone x image size x mask mode), run it, show the best first.
#   bash sweeps/grid.sh            # queue + run + table
#   dvc exp branch <exp-name> best-model   # promote the winner to a branch
set -euo pipefail
for model in mobilenet_attention efficientnet_lite0_attention; do
  for size in 128 160; do
    for mode in crop none; do
      dvc exp run --queue -S "models.${model}.image_size=${size}" -S "train.mask_mode=${mode}" \
        --name "${model%_attention}-${size}-${mode}"
    done
  done
done
dvc queue start --jobs 1
dvc queue status
while dvc queue status | grep -qE "Queued|Running"; do sleep 10; done
dvc exp show --sort-by metrics/summary.json:ensemble.macro_f1 --sort-order desc \
  --only-changed --md
