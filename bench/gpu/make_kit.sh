#!/usr/bin/env bash
# The GPU kit: what a device session carries to the lent GPU machine (the `device` tool) to run
# bench/gpu/run.sh there. That machine has Python 3.12 with a CUDA PyTorch, numpy, scipy, pandas,
# matplotlib, typer, rich, tqdm, pyyaml, tifffile, scikit-image... but not medsup's other dependencies,
# nor nnU-Net v2's, and it cannot download. This script, run HERE (it needs the package index), fetches
# them as Python 3.12 x86-64 wheels at the versions of .venv (medsup) and .venv-bench (nnU-Net v2),
# unpacks them into one folder and packs it as .gpu-kit/site.tar.xz: 50-60 MB, under the tool's 64 MiB
# per call with the working tree (~2 MB). Left out to fit: MLflow's web UI (mlflow/server/js, not used
# there) and imagecodecs (tifffile's optional codecs; nnU-Net's TIFF reader is not used).
#
# Usage: bash bench/gpu/make_kit.sh        (5-10 min, mostly one core of xz; .gpu-kit/ is git-ignored)
# Then one device call:  carry [".gpu-kit"], command "bash bench/gpu/run.sh"   (see run.sh)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
KIT=.gpu-kit
PY="${PY:-.venv/bin/python}"
PY_BENCH="${PY_BENCH:-.venv-bench/bin/python}"

# medsup's runtime dependencies (and theirs) that the device image lacks; dev tools stay behind
CORE=(monai nibabel zlib-ng simpleitk pytorch-ignite pydantic pydantic-core annotated-types typing-inspection
mlflow mlflow-skinny mlflow-tracing alembic mako sqlalchemy sqlparse flask flask-cors blinker itsdangerous
graphene graphql-core graphql-relay gunicorn huey cachetools databricks-sdk google-auth pyasn1 pyasn1-modules
cryptography cffi pycparser docker fastapi starlette uvicorn gitpython gitdb smmap importlib-metadata
importlib-resources opentelemetry-api opentelemetry-proto opentelemetry-sdk opentelemetry-semantic-conventions
prettytable wcwidth python-dotenv skops)
# nnU-Net v2 for the side-by-side rows of infer_e2e.py and train_step.py
NNUNET=(nnunetv2 dynamic-network-architectures batchgenerators batchgeneratorsv2 acvl-utils
connected-components-3d blosc2 ndindex numexpr yacs graphviz future linecache2 traceback2 unittest2)

pins() {  # "name==version" for each name that the interpreter $1 has installed
    "$1" -m pip list --format=freeze 2>/dev/null | awk -v want=" $2 " 'BEGIN { FS = "==" }
        { n = tolower($1); gsub("_", "-", n); if (index(want, " " n " ")) print n "==" $2 }'
}
rm -rf "$KIT" && mkdir -p "$KIT/wheels" "$KIT/site"
{ pins "$PY" "${CORE[*]}"; pins "$PY_BENCH" "${NNUNET[*]}"; } > "$KIT/requirements.txt"
wanted=$(( ${#CORE[@]} + ${#NNUNET[@]} ))
if [ "$(wc -l < "$KIT/requirements.txt")" -ne "$wanted" ]; then
    echo "make_kit: $PY and $PY_BENCH do not hold every package ($(wc -l < "$KIT/requirements.txt") of $wanted);" \
         "set them up first (README, BENCHMARKS.md)" >&2
    exit 1
fi
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64; do platforms+=(--platform "$p"); done
while read -r req; do
    # a wheel for Python 3.12 on x86-64 Linux; a pure-Python package published as an sdist only is built here
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${platforms[@]}" -d "$KIT/wheels" "$req" 2>/dev/null \
        || "$PY" -m pip wheel -q --no-deps -w "$KIT/wheels" "$req"
done < "$KIT/requirements.txt"
for wheel in "$KIT"/wheels/*.whl; do
    case "$wheel" in *-py3-none-any.whl|*-py2.py3-none-any.whl|*cp312*|*abi3*) ;;
        *) echo "make_kit: $wheel is not for CPython 3.12" >&2; exit 1 ;; esac
    python3 -m zipfile -e "$wheel" "$KIT/site"
done
rm -rf "$KIT/site/mlflow/server/js"
find "$KIT/site" -name __pycache__ -type d -prune -exec rm -rf {} +
tar -C "$KIT/site" -cf - . | xz -9e -T1 > "$KIT/.site.tar.xz.tmp"
mv "$KIT/.site.tar.xz.tmp" "$KIT/site.tar.xz"  # a kit that exists is whole
rm -rf "$KIT/site" "$KIT/wheels"
size=$(stat -c %s "$KIT/site.tar.xz")
echo "make_kit: $KIT/site.tar.xz $((size / 1048576)) MiB ($(wc -l < "$KIT/requirements.txt") packages)"
if [ "$size" -gt $((60 * 1048576)) ]; then
    echo "make_kit: over 60 MiB: with the working tree it may not fit one device call (64 MiB)" >&2
    exit 1
fi
