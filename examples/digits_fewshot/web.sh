#!/usr/bin/env bash
# Fine-tune the example in a browser: builds the artifacts and the data files, then serves the page.
# Usage: web.sh [WORK_DIR] [PORT]   (needs Node 20+; installs runtimes/web's npm packages once)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
web="$here/../../runtimes/web"
work=${1:-$here/work}
port=${2:-8080}

[ -d "$web/node_modules/onnxruntime-web" ] || (cd "$web" && npm ci --prefer-offline --no-audit --no-fund --loglevel=error)
python "$here/prepare_data.py" "$work"
edgeplug rewrite "$here/pretrained_cnn.onnx" --recipe "$here/recipe.yaml" --calibration-data "$work/support.npz" \
  -o "$work/artifacts" --force
mkdir -p "$work/web-data"
edgeplug pack-data "$work/artifacts" "$work/support.npz" -o "$work/web-data/support.safetensors"
edgeplug pack-data "$work/artifacts" "$work/query.npz" -o "$work/web-data/query.safetensors"
echo "== pick support.safetensors to train on and query.safetensors to evaluate on (or the files listed on the page)"
exec node "$web/serve.mjs" --artifacts "$work/artifacts" --data "$work/web-data" --port "$port"
