# Sourced by the pipelines (not run): finds the repository and the medsup executable, whatever the
# current folder (`mlflow run pipelines` runs the entry points inside pipelines/).
#   ROOT     the repository root
#   BIN      folder holding medsup: $BIN if set, else ROOT/.venv/bin, else wherever `medsup` is on PATH
#   medsup   a function calling "$BIN/medsup"
# shellcheck shell=bash

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -z "${BIN:-}" ]; then
    if [ -x "$ROOT/.venv/bin/medsup" ]; then
        BIN="$ROOT/.venv/bin"
    elif command -v medsup >/dev/null 2>&1; then
        BIN="$(dirname "$(command -v medsup)")"
    else
        echo "error: no medsup executable: run \`make venv\` in $ROOT, or set BIN to the folder holding medsup" >&2
        exit 2
    fi
fi
BIN="$(cd "$BIN" && pwd)"

medsup() { "$BIN/medsup" "$@"; }

# step "what": a visible header between the commands' own logs
step() { printf '\n==> %s\n' "$*" >&2; }

# quote VALUE: VALUE in single quotes, for commands printed to be pasted back into a shell
quote() { printf "'%s'" "${1//\'/\'\\\'\'}"; }
