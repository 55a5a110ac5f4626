#!/usr/bin/env bash
# The deep-supervision ablation (entry point `ablation`): does supervising every decoder scale help?
#   synthesise a labelled pool and a separate labelled test set -> plan once
#   -> train every arm: scheme x seed x training-set size, the same budget, into ONE MLflow experiment;
#      early exit: infer the test set from each exit level K (models of the largest size) and evaluate;
#      record the finished arm in DOCS/arms/<arm>.json (what the report needs, committed with it)
#   -> `medsup ablation summarize`: DOCS/ablation.md (tables, a generated default-scheme paragraph, the
#      commands that reproduce it) + ablation.png + ablation.json.
#   -> `medsup ablation overview`: every task's report side by side, with a verdict on the default scheme
#      (docs/ablation.md from docs/ablation/*/ with the default DOCS; else DOCS/overview.md)
#
# Lung. The preset's 4 mm grid erases the nodules (median 9 mm, a quarter under 5 mm): lung plans at 2 mm.
# Six validation cases hold 8 nodules (three held two), and a 2 mm validation pass over them costs ~46 s
# on 2 cores, as much as ten epochs of training: lung validates every 20 epochs (5 passes), and "epochs to
# threshold" is then known to within 20 epochs. Nodules are learnt slowly (a 2 mm pilot, 18 training cases:
# validation nodule Dice 0.02 after 60 epochs of 20 iterations, 0.07 after 100, 0.12 after 160): lung arms get 100
# epochs, ~12 minutes each on 2 cores (~6 hours for the 27 arms and their early exits: more than one session,
# hence the arm records below). Five of the six validation cases hold a single 3-6 mm nodule (2-11 voxels) or
# none, which pins their Dice near 0 or 1: the lung report ranks the arms by the global validation Dice
# (val.dice_global.tumour) instead of the per-case mean.
#
# Fair arms. Every arm trains on the same plan (patch, spacing, network) for EPOCHS x ITERATIONS optimiser
# steps of the same batch size, whatever its training-set size (patches are drawn with replacement). The
# pool holds VAL_CASES x (ceil(max size / VAL_CASES) + 1) cases split into folds of exactly VAL_CASES;
# fold 0 is the validation set of EVERY arm (data.split_seed is fixed, so changing the seed does not move
# it), and an arm of size N trains on N cases of the rest (data.max_train_cases: a seeded subset, nested
# across sizes). Validation runs every epoch, so "epochs to threshold" is exact. Models are not registered.
#
# Usage: bash pipelines/ablation.sh                 settings as environment variables (empty = default):
#   TASK         liver | lung (| tiny)              liver           (smoke: tiny)
#   SCHEMES      loss.scheme values                 "none nnunet dsn"
#   SEEDS        training seeds                     "0 1 2"         (smoke: "0")
#   SIZES        training-set sizes (n_train)       "2 5 20"        (smoke: "1 2")
#   VAL_CASES    validation cases (shared by all)   3               (smoke: 2)
#   TEST_CASES   labelled test cases (early exit)   5               (smoke: 1)
#   EPOCHS       epochs per arm                     30              (lung: 100; smoke: 1)
#   ITERATIONS   iterations per epoch               20              (smoke: 3)
#   EXIT_LEVELS  heads to exit from (0 = full)      "0 1 2"         (smoke: "0 1")
#   VAL_EVERY    validate every N epochs            1               (lung: 20)
#   PRESET       config preset                      ablation        (smoke: smoke)
#   PLAN_SET     overrides for the plan all arms share  none        (lung: plan.target_spacing=[2.0,2.0,2.0])
#   SET          extra config overrides, space-separated a.b=c, applied to every arm
#   EXPERIMENT   MLflow experiment                  medsup-ablation
#   OUT          data, run folders, early-exit outputs; the MLflow store unless MLFLOW_TRACKING_URI is set
#                runs/pipelines/ablation-TASK   (smoke: runs/pipelines/ablation-smoke)
#   DOCS         where ablation.md goes             docs/ablation/TASK  (smoke: OUT/docs)
#   SMOKE=1      the whole chain in minutes, with meaningless numbers
# An arm whose run folder already holds a model is not trained again, an arm stopped part way resumes from
# its last checkpoint (same MLflow run), and an evaluated early exit is not redone: a stopped ablation goes
# on where it was (delete OUT to start over with other settings). Every finished arm is also recorded in
# DOCS/arms/<arm>.json (its run's params and curves, its early-exit results; `medsup ablation record`), and a
# recorded arm is never redone: commit the records and a fresh checkout goes on where the last one stopped,
# with the report counting every recorded arm (delete DOCS/arms too to start over).
set -euo pipefail
# shellcheck source=pipelines/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

#  TASK  SEEDS    SIZES   VAL TEST EPOCHS ITER EXIT_LEVELS PRESET OUT-suffix VAL_EVERY PLAN_SET
if [ "${SMOKE:-0}" = 1 ]; then
    d=(tiny "0" "1 2" 2 1 1 3 "0 1" smoke "-smoke" 1 "")
elif [ "${TASK:-}" = lung ]; then
    d=(lung "0 1 2" "2 5 20" 6 5 100 20 "0 1 2" ablation "" 20 "plan.target_spacing=[2.0,2.0,2.0]")
else
    d=(liver "0 1 2" "2 5 20" 3 5 30 20 "0 1 2" ablation "" 1 "")
fi
TASK="${TASK:-${d[0]}}"
SCHEMES="${SCHEMES:-none nnunet dsn}"
SEEDS="${SEEDS:-${d[1]}}"
SIZES="${SIZES:-${d[2]}}"
VAL_CASES="${VAL_CASES:-${d[3]}}"
TEST_CASES="${TEST_CASES:-${d[4]}}"
EPOCHS="${EPOCHS:-${d[5]}}"
ITERATIONS="${ITERATIONS:-${d[6]}}"
EXIT_LEVELS="${EXIT_LEVELS:-${d[7]}}"
PRESET="${PRESET:-${d[8]}}"
VAL_EVERY="${VAL_EVERY:-${d[10]}}"
PLAN_SET="${PLAN_SET:-${d[11]}}"
EXPERIMENT="${EXPERIMENT:-medsup-ablation}"
OUT="${OUT:-$ROOT/runs/pipelines/ablation${d[9]:--$TASK}}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
# one report per task (docs/ablation.md is the overview across tasks, written from these)
if [ "${SMOKE:-0}" = 1 ]; then DOCS="${DOCS:-$OUT/docs}"; else DOCS="${DOCS:-$ROOT/docs/ablation/$TASK}"; fi
mkdir -p "$DOCS"
DOCS="$(cd "$DOCS" && pwd)"
RECORDS="$DOCS/arms"
# a path inside the repository relative to its root (the reports and records are committed), others as they are
rel() { case "$1" in "$ROOT"/*) printf '%s' "${1#"$ROOT"/}" ;; *) printf '%s' "$1" ;; esac; }
export MLFLOW_TRACKING_URI="${MLFLOW_TRACKING_URI:-sqlite:///$OUT/mlflow.db}"
# the store as the committed report and records name it: relative to the root, from which they are written
uri="$MLFLOW_TRACKING_URI"
case "$uri" in "sqlite:///$ROOT/"*) uri="sqlite:///$(rel "${uri#sqlite:///}")" ;; esac

largest=0
for n in $SIZES; do
    if [ "$n" -gt "$largest" ]; then largest="$n"; fi
done
folds=$(((largest + VAL_CASES - 1) / VAL_CASES + 1))
pool=$((folds * VAL_CASES))

if [ -f "$OUT/data/dataset.json" ] && [ -f "$OUT/test/dataset.json" ] && [ -f "$OUT/plan.json" ]; then
    step "the $TASK pool, test set and plan: made already, kept"  # synth writes dataset.json last
else
    step "synthesise a $pool-case $TASK pool ($folds folds of $VAL_CASES) and $TEST_CASES labelled test cases"
    medsup synth --task "$TASK" --cases "$pool" --test-cases 0 --seed 0 --out "$OUT/data"
    medsup synth --task "$TASK" --cases "$TEST_CASES" --test-cases 0 --seed 1 --out "$OUT/test"
    plan_args=()
    for kv in $PLAN_SET; do plan_args+=(--set "$kv"); done
    medsup plan --task "$TASK" --data "$OUT/data" --preset "$PRESET" --out "$OUT/plan.json" "${plan_args[@]}"
fi

common=(--set data.num_folds="$folds" --set data.fold=0 --set data.split_seed=0
    --set train.epochs="$EPOCHS" --set train.iterations_per_epoch="$ITERATIONS" --set train.val_every="$VAL_EVERY"
    --set train.early_stop_patience=0 --set tracking.register_best=false)
for kv in ${SET:-}; do common+=(--set "$kv"); done

if compgen -G "$RECORDS/*.json" >/dev/null; then
    # arms recorded by an earlier checkout: their runs back into this store, so the experiment holds every arm
    step "restore the recorded arms of $(rel "$RECORDS") into experiment $EXPERIMENT"
    (cd "$ROOT" && medsup -q ablation restore --records "$(rel "$RECORDS")" --experiment "$EXPERIMENT")
fi

# seed, then size, then scheme: a stopped ablation has every scheme of the (seed, size) pairs it finished.
# Each arm is recorded as soon as it is finished (trained and, at the largest size, early-exited): RECORDS holds
# one JSON per arm beside the report, committed with it, so a fresh checkout (no OUT, no MLflow store) skips the
# recorded arms, restores their runs into its store (above) and the report still counts them, early exits
# included (`medsup ablation summarize --records`).
for seed in $SEEDS; do
    for n in $SIZES; do
        for scheme in $SCHEMES; do
            name="ablation-$TASK-$scheme-seed$seed-n$n"
            if [ -f "$RECORDS/$name.json" ]; then
                step "$name: recorded already ($(rel "$RECORDS/$name.json")), kept"
                continue
            fi
            if [ -f "$OUT/runs/$name/model/weights.pt" ]; then
                step "$name: trained already, kept"
            elif [ -f "$OUT/runs/$name/checkpoints/last.pt" ]; then
                # an arm stopped part way (a killed session): go on from its last epoch, in the same MLflow run
                step "$name: resume from its last checkpoint"
                medsup -q train --task "$TASK" --data "$OUT/data" --resume "$OUT/runs/$name"
            else
                step "$name: train ($EPOCHS x $ITERATIONS iterations on $n cases)"
                medsup -q train --task "$TASK" --data "$OUT/data" --preset "$PRESET" --plan "$OUT/plan.json" \
                    --output "$OUT/runs/$name" --experiment "$EXPERIMENT" --run-name "$name" "${common[@]}" \
                    --set loss.scheme="$scheme" --set seed="$seed" --set data.max_train_cases="$n"
            fi
            record=(--run-name "$name" --experiment "$EXPERIMENT" --out "$(rel "$RECORDS")")
            if [ "$n" = "$largest" ]; then
                # early exit now, while the model is at hand: the record keeps the results, not the model
                for level in $EXIT_LEVELS; do
                    dir="$OUT/early_exit/$name/exit$level"
                    if [ -f "$dir/evaluation/summary.json" ]; then
                        step "$name: early exit from head $level evaluated already, kept"
                        continue
                    fi
                    step "$name: early exit from head $level on the test set"
                    medsup -q infer -i "$OUT/test/imagesTr" -o "$dir" --model "$OUT/runs/$name/model" \
                        --exit-level "$level"
                    medsup -q evaluate --pred "$dir" --ref "$OUT/test" --task "$TASK" --out "$dir/evaluation"
                done
                record+=(--early-exit "$(rel "$OUT/early_exit/$name")")
            fi
            # paths in the record relative to the root
            (cd "$ROOT" && MLFLOW_TRACKING_URI="$uri" medsup -q ablation record "${record[@]}")
        done
    done
done

settings=""
for var in TASK SCHEMES SEEDS SIZES VAL_CASES TEST_CASES EPOCHS ITERATIONS EXIT_LEVELS VAL_EVERY PRESET PLAN_SET SET \
    EXPERIMENT; do
    if [ -n "${!var:-}" ]; then settings+="$var=$(quote "${!var}") "; fi
done
params=""
for var in TASK SCHEMES SEEDS SIZES EPOCHS ITERATIONS EXIT_LEVELS VAL_EVERY PLAN_SET SET; do
    if [ -n "${!var:-}" ]; then params+="-P $(printf '%s' "$var" | tr '[:upper:]' '[:lower:]')=$(quote "${!var}") "; fi
done
# the reports are committed: they name paths inside the repository relative to its root, and are written from it
cd "$ROOT"
mkdir -p "$OUT/early_exit"  # none in this checkout when every arm was recorded by an earlier one
step "summarise experiment $EXPERIMENT into $(rel "$DOCS")"
MLFLOW_TRACKING_URI="$uri" medsup ablation summarize --experiment "$EXPERIMENT" --task "$TASK" --out "$(rel "$DOCS")" \
    --early-exit "$(rel "$OUT/early_exit")" --records "$(rel "$RECORDS")" \
    --reproduce "${settings}SMOKE=${SMOKE:-0} bash pipelines/ablation.sh" \
    --reproduce "# or: mlflow run pipelines -e ablation ${params}-P smoke=${SMOKE:-0} --env-manager local" \
    --reproduce "# arms with a record in $(rel "$RECORDS") are restored, not retrained: delete it to retrain every arm"

# the overview across tasks: with the default report folders, every task's report so far -> docs/ablation.md
if [ "$DOCS" = "$ROOT/docs/ablation/$TASK" ]; then
    overview=(docs/ablation --out docs/ablation.md)
else
    overview=("$(rel "$DOCS")" --out "$(rel "$DOCS")/overview.md")
fi
step "overview across tasks: ${overview[2]}"
medsup ablation overview "${overview[@]}" \
    --reproduce "# each task's report first (its own ablation.md says how): TASK=<task> bash pipelines/ablation.sh"

cat <<EOT

ablation finished:
  report         $DOCS/ablation.md (+ ablation.png, ablation.json)
  overview       ${overview[2]} (+ .png, .json), across the tasks in ${overview[0]}
  runs           $OUT/runs/<arm>, MLflow experiment $EXPERIMENT
  early exit     $OUT/early_exit/<arm>/exit<K> (report.json, evaluation/summary.json)
  MLflow store   $MLFLOW_TRACKING_URI  (browse: $BIN/mlflow ui --backend-store-uri $MLFLOW_TRACKING_URI)
EOT
