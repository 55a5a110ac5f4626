#!/usr/bin/env bash
# The GPU figures of BENCHMARKS.md (issue #7) on the lent GPU machine, in two device calls whose step limits
# add up to ~7.5 (train) and ~6 (infer) minutes, so that both and the machine's start fit a session's 15 minutes
# of device time (the steps are ordered by what issue #7 needs most; a step cut by its limit still leaves its log):
#   device run  carry [".gpu-kit"]  command "bash bench/gpu/run.sh train"   CUDA tests, train_step, norm_kernel, dataload
#   device run  carry [".gpu-kit"]  command "bash bench/gpu/run.sh infer"   infer_e2e (nnU-Net, MONAI), memory, layout, batch
# .gpu-kit/ comes from bench/gpu/make_kit.sh (run here first). Every step has its own time limit and log
# ($OUT/<step>.log, the device tool brings $OUT back, at most 8 files: train writes 8, infer 8); one failing step
# does not stop the others.
# Check the commands here, without a GPU and without the kit (its wheels are for the device's Python 3.12):
#   KIT= QUICK=1 DEVICE=cpu PY=.venv-bench/bin/python bash bench/gpu/run.sh train   (and infer)
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.." || exit 1
PART="${1:?usage: bash bench/gpu/run.sh train|infer}"
OUT="${OUT:-runs/gpu}"
PY="${PY:-python3}"
KIT="${KIT-.gpu-kit/site.tar.xz}"
SITE="${SITE:-/tmp/medsup-site}"
QUICK="${QUICK:-0}"
DEVICE="${DEVICE:-cuda}"
mkdir -p "$OUT"
if [ -n "$KIT" ]; then
    if [ ! -f "$KIT" ]; then
        echo "run.sh: no $KIT: build it here with bash bench/gpu/make_kit.sh and carry .gpu-kit" >&2
        exit 2
    fi
    if [ ! -f "$SITE/.unpacked" ]; then  # a second call on a still-warm machine finds it unpacked
        mkdir -p "$SITE" && tar -C "$SITE" -xJf "$KIT" && touch "$SITE/.unpacked"
    fi
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 MPLBACKEND=Agg MLFLOW_DISABLE_TELEMETRY=true

step() {  # step NAME SECONDS COMMAND...: run it under a time limit, log to $OUT/NAME.log, show its end
    local name=$1 limit=$2 start=$SECONDS rc
    shift 2
    echo "== $name (limit ${limit} s): $*" | tee -a "$OUT/summary.log"
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    echo "   $name: exit $rc after $((SECONDS - start)) s" | tee -a "$OUT/summary.log"
    tail -n 30 "$OUT/$name.log"
}

step env 25 "$PY" -c "import torch, monai, mlflow, SimpleITK, ignite, medsup
print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')
print('monai', monai.__version__, 'mlflow', mlflow.__version__, 'SimpleITK', SimpleITK.Version_VersionString())
try:
    import nnunetv2  # noqa: F401
    print('nnunetv2 imports')
except Exception as err:
    print('nnunetv2 does not import:', err)"
command -v nvidia-smi >/dev/null && nvidia-smi >> "$OUT/env.log" 2>&1  # in env.log: $OUT brings back 8 files

if [ "$PART" = train ]; then
    if [ "$QUICK" = 1 ]; then
        step train-step 300 "$PY" bench/train_step.py --device "$DEVICE" --quick --host-reads both
        step norm-kernel 120 "$PY" bench/norm_kernel.py --device "$DEVICE" --repeats 3
        step synth 15 "$PY" -m medsup synth --task liver --cases 4 --out /tmp/liver_synth --test-cases 0
        step dataload 120 "$PY" bench/dataload.py --data /tmp/liver_synth --preset quick --batches 12 \
            --target-rate 25 --copy-repeats 1 --augment-repeats 1 --samples 4
    else
        step gpu-tests 90 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/gpu
        # it/s, patches/s, TFLOP/s, MFU of the liver and lung plans: fp32 vs bf16 autocast, nnU-Net's step beside
        step train-step 100 "$PY" bench/train_step.py --device cuda --tasks liver,lung --iters 20 --repeats 3 \
            --amp off,on --compile off --channels-last off
        # bf16 liver: channels_last_3d off/on (cuDNN's tensor cores prefer NDHWC: should CUDA train in it?) x the
        # host reading the loss every step (as before train.sync_every) or every 10; fp16 + GradScaler (nnU-Net's
        # dtype); torch.compile (one log: 8 files come back)
        step train-step-more 120 bash -c "$PY bench/train_step.py --device cuda --tasks liver --iters 20 \
            --repeats 3 --amp on --compile off --channels-last off,on --host-reads both --nnunet off; \
            $PY bench/train_step.py --device cuda --tasks liver --iters 20 --repeats 3 --amp fp16 --compile off \
            --channels-last off --nnunet off; \
            $PY bench/train_step.py --device cuda --tasks liver --iters 20 --repeats 3 --amp on --compile on \
            --channels-last off --nnunet off"
        # instance norm on CUDA as torch runs it vs group_norm (what medsup runs on a CPU): should CUDA switch?
        step norm-kernel 25 "$PY" bench/norm_kernel.py --device cuda --preset '' --amp off,on --repeats 7
        # the real loader (12 workers) feeding the liver step: does it starve the GPU? (synth first, same log)
        step train-step-data 45 bash -c "$PY -m medsup synth --task liver --cases 4 --out /tmp/liver_synth \
            --test-cases 0 && $PY bench/train_step.py --device cuda --tasks liver --data on \
            --dataset /tmp/liver_synth --amp on --compile off --channels-last off --iters 30 --repeats 2 \
            --workers 12 --nnunet off"
        # the loader alone at the reference scale (128^3 at 0.77 mm) with the auto worker count, against the
        # 25 samples/s of 250 iterations x 2 patches in 20 s, and MONAI's per-sample cache copy beside it
        step dataload 45 "$PY" bench/dataload.py --data /tmp/liver_synth --preset "" \
            --set "plan.target_spacing=[0.77,0.77,0.77]" --set "plan.patch_size=[128,128,128]" \
            --device cuda --batches 60 --target-rate 25 --copy-repeats 0 --augment-repeats 1 --samples 10
    fi
elif [ "$PART" = infer ]; then
    if [ "$QUICK" = 1 ]; then
        step infer-e2e 300 "$PY" bench/infer_e2e.py --device "$DEVICE" --quick --python "$PY"
        step infer-layout 120 "$PY" bench/infer_layout.py --device "$DEVICE" --plans coarse --repeats 3
        step infer-batch 120 "$PY" bench/infer_batch.py --device "$DEVICE" --no-real --sizes 40,40 --repeats 1
    else
        # same input, step 0.5: medsup vs nnU-Net v2's predictor vs the MONAI tutorial, TTA off, then on
        step infer-e2e 170 "$PY" bench/infer_e2e.py --device cuda --plan liver --sizes 300 --repeats 3 \
            --no-real --python "$PY" --json "$OUT/e2e.json" --timeout 150
        step infer-e2e-tta 70 "$PY" bench/infer_e2e.py --device cuda --plan liver --tta --sizes 100 --repeats 2 \
            --no-real --python "$PY" --json "$OUT/e2e-tta.json" --timeout 60
        step infer-memory 40 "$PY" bench/infer_memory.py --slices 1000 --spacing 1.6 --device cuda
        # the network's call in torch's layout vs channels-last (what a CPU uses): should CUDA switch too? Then a
        # batch writing each case while the next runs vs before it starts (one log: 8 files come back)
        step infer-layout-batch 70 bash -c "$PY bench/infer_layout.py --device cuda --plans liver,lung --amp off,on \
            --repeats 5; $PY bench/infer_batch.py --device cuda --plan liver --no-real --sizes 100,300 --repeats 3"
    fi
else
    echo "usage: bash bench/gpu/run.sh train|infer" >&2
    exit 2
fi
cat "$OUT/summary.log"
