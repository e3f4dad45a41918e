#!/usr/bin/env bash
# The README's main job: few-shot fine-tuning of a pretrained CNN as a device would
# do it, end to end through the edgeplug CLI. Usage: run.sh [WORK_DIR]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
work=${1:-$here/work}

echo "== data: 10-way 5-shot support set and a query set from scikit-learn digits"
python "$here/prepare_data.py" "$work"
echo "== inspect the pretrained model (trained on digits 0-4 only)"
edgeplug inspect "$here/pretrained_cnn.onnx"
python "$here/check_export.py" "$here/pretrained_cnn.onnx" "$work/query.npz" "pretrained model, its own head"
echo "== rewrite: a new head from the support set's class prototypes, last two layers train, batch norms frozen"
edgeplug rewrite "$here/pretrained_cnn.onnx" --recipe "$here/recipe.yaml" --calibration-data "$work/support.npz" \
  -o "$work/artifacts" --force
echo "== train on the device (accuracy before/after, step time, peak memory)"
edgeplug train "$work/artifacts" --data "$work/support.npz" --eval "$work/query.npz" \
  --epochs 20 --batch-size 10 --restart --no-progress
echo "== export the fine-tuned inference model"
edgeplug export "$work/artifacts" -o "$work/finetuned.onnx"
python "$here/check_export.py" "$work/finetuned.onnx" "$work/query.npz"
