#!/usr/bin/env bash
# `make demo`: the main job end to end on built-in synthetic data, on whatever machine this is.
#   synthesise 20 liver CTs -> check -> plan -> train the quick preset (registers medsup-liver@candidate)
#   -> promote to champion -> batch inference on the test images through models:/medsup-liver@champion.
# Everything lands in $DEMO_DIR (default demo/), the MLflow store included.
set -euo pipefail
# shellcheck source=pipelines/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"  # ROOT, BIN (.venv/bin of the repository) and medsup
DEMO_DIR="${DEMO_DIR:-$ROOT/demo}"
PRESET="${PRESET:-quick}"
mkdir -p "$DEMO_DIR"
DEMO_DIR="$(cd "$DEMO_DIR" && pwd)"
export MLFLOW_TRACKING_URI="sqlite:///$DEMO_DIR/mlflow.db"
data="$DEMO_DIR/liver_synth"

medsup synth --task liver --cases 20 --out "$data" --seed 0
medsup data check "$data" --task liver
medsup plan --task liver --data "$data" --out "$DEMO_DIR/plan.json" --preset "$PRESET"
medsup model --task liver --plan "$DEMO_DIR/plan.json"
medsup train --task liver --data "$data" --preset "$PRESET" --plan "$DEMO_DIR/plan.json" \
    --output "$DEMO_DIR/run" --run-name "demo-$PRESET"
medsup models promote --task liver --from-alias candidate --alias champion
medsup models list --task liver
medsup infer -i "$data/imagesTs" -o "$DEMO_DIR/predictions" --model models:/medsup-liver@champion

cat <<EOT

demo finished:
  predictions   $DEMO_DIR/predictions (one label file per test image)
  report        $DEMO_DIR/predictions/report.json
  run folder    $DEMO_DIR/run (checkpoints, plan, curves, model bundle)
  MLflow store  $MLFLOW_TRACKING_URI  (browse: $BIN/mlflow ui --backend-store-uri $MLFLOW_TRACKING_URI)
EOT
