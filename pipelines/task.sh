#!/usr/bin/env bash
# A cross-validated model for one task, end to end (entry points `liver` and `lung`):
#   [synthesise data] -> check -> plan (once, shared by every fold)
#   -> per fold: train (fits the postprocessing on the fold's validation cases into the bundle, then
#                registers its best model as a new version of medsup-<task>, alias candidate)
#                -> infer the fold's validation cases (`medsup data split`: the split training used; with the
#                   rules fitted on them, so their Dice is optimistic by what the rules gained, as nnU-Net's)
#                -> evaluate them against their labels, logged onto the fold's MLflow run
#   -> promote the version with the best validation Dice (among this pipeline's experiment) to champion
#   -> batch inference of the test images (DATA/imagesTs) through models:/medsup-<task>@champion.
#
# Usage: bash pipelines/task.sh liver|lung          settings as environment variables (empty = default):
#   FOLDS       folds to train                      "0 1 2 3 4"   (smoke: "0")
#   PRESET      config preset                       quick         (smoke: smoke)
#   DATA        dataset folder; synthesised with CASES cases when it does not exist   OUT/data
#   CASES       cases to synthesise                 20            (smoke: 3)
#   SET         extra config overrides, space-separated a.b=c (e.g. "loss.scheme=dsn train.epochs=60")
#   OUT         run folders, predictions, evaluations; the MLflow store unless MLFLOW_TRACKING_URI is set
#               runs/pipelines/<task>  (smoke: runs/pipelines/<task>-smoke)
#   EXPERIMENT  MLflow experiment of the fold runs  medsup-<task>-cv
#   SMOKE=1     check the chain in minutes: smoke preset, fold 0, 3 small cases, 1 epoch (a useless model)
set -euo pipefail
# shellcheck source=pipelines/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

TASK="${1:?usage: task.sh liver|lung}"
if [ "${SMOKE:-0}" = 1 ]; then
    d_folds="0" d_preset="smoke" d_cases=3 smoke_set=(train.epochs=1 train.val_max_cases=1)
    synth_set=(--set synth.voxel_mm=6 --test-cases 1) suffix="-smoke"
else
    d_folds="0 1 2 3 4" d_preset="quick" d_cases=20 smoke_set=() synth_set=() suffix=""
fi
FOLDS="${FOLDS:-$d_folds}"
PRESET="${PRESET:-$d_preset}"
CASES="${CASES:-$d_cases}"
OUT="${OUT:-$ROOT/runs/pipelines/$TASK$suffix}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
DATA="${DATA:-$OUT/data}"
EXPERIMENT="${EXPERIMENT:-medsup-$TASK-cv}"
export MLFLOW_TRACKING_URI="${MLFLOW_TRACKING_URI:-sqlite:///$OUT/mlflow.db}"
sets=()
for kv in ${smoke_set[@]+"${smoke_set[@]}"} ${SET:-}; do sets+=(--set "$kv"); done

if [ ! -d "$DATA" ]; then
    step "synthesise $CASES $TASK cases into $DATA (no such folder)"
    medsup synth --task "$TASK" --cases "$CASES" --out "$DATA" --seed 0 ${synth_set[@]+"${synth_set[@]}"}
fi
step "check and plan $DATA"
medsup data check "$DATA" --task "$TASK"
medsup plan --task "$TASK" --data "$DATA" --preset "$PRESET" --out "$OUT/plan.json" ${sets[@]+"${sets[@]}"}

for fold in $FOLDS; do
    run="$OUT/fold$fold"
    step "fold $fold: train -> $run"
    summary="$(medsup train --task "$TASK" --data "$DATA" --preset "$PRESET" --plan "$OUT/plan.json" --fold "$fold" \
        --output "$run" --experiment "$EXPERIMENT" --run-name "$TASK-fold$fold" ${sets[@]+"${sets[@]}"} --json)"
    run_id="$(printf '%s\n' "$summary" | sed -n 's/^ *"run_id": "\([0-9a-f]*\)".*/\1/p')"

    step "fold $fold: infer and evaluate its validation cases (MLflow run $run_id)"
    split=(--task "$TASK" --fold "$fold" --preset "$PRESET" ${sets[@]+"${sets[@]}"})
    medsup data split "$DATA" "${split[@]}" >"$run/val_images.txt"
    medsup data split "$DATA" "${split[@]}" --labels >"$run/val_labels.txt"
    rm -rf "$run/val_labels" && mkdir -p "$run/val_labels"
    while IFS= read -r label; do ln -s "$label" "$run/val_labels/"; done <"$run/val_labels.txt"
    medsup infer -i "$run/val_images.txt" -o "$run/val_predictions" --model "$run/model"
    medsup evaluate --pred "$run/val_predictions" --ref "$run/val_labels" --task "$TASK" \
        --out "$run/val_evaluation" ${run_id:+--log-to "$run_id"}
done

step "promote the best fold's version to champion"
medsup models promote --task "$TASK" --best --metric val_dice --experiment "$EXPERIMENT" --alias champion
medsup models list --task "$TASK"

if [ -d "$DATA/imagesTs" ] && [ -n "$(ls -A "$DATA/imagesTs")" ]; then
    step "batch inference of $DATA/imagesTs through models:/medsup-$TASK@champion"
    medsup infer -i "$DATA/imagesTs" -o "$OUT/test_predictions" --model "models:/medsup-$TASK@champion"
fi

cat <<EOT

$TASK pipeline finished:
  folds          $FOLDS: run folders $OUT/fold<k> (val_predictions/, val_evaluation/summary.json)
  champion       models:/medsup-$TASK@champion (best validation Dice among experiment $EXPERIMENT)
  test outputs   $OUT/test_predictions (when DATA/imagesTs holds images)
  MLflow store   $MLFLOW_TRACKING_URI  (browse: $BIN/mlflow ui --backend-store-uri $MLFLOW_TRACKING_URI)
EOT
