#!/usr/bin/env bash
# `make demo`: the main job on built-in synthetic data. Grows with each capability.
set -euo pipefail
DEMO_DIR="${DEMO_DIR:-demo}"
BIN="${BIN:-.venv/bin}"
data="$DEMO_DIR/liver_synth"
"$BIN/medsup" synth --task liver --cases 20 --out "$data" --seed 0
"$BIN/medsup" data check "$data" --task liver
"$BIN/medsup" plan --task liver --data "$data" --out "$DEMO_DIR/plan.json"
"$BIN/medsup" model --task liver --plan "$DEMO_DIR/plan.json"
echo "demo: dataset in $data, plan in $DEMO_DIR/plan.json"
