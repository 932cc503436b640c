#!/usr/bin/env bash
# One prepared GPU check: every speed and memory figure at full size (issue 16).
#
#   bash benchmarks/gpu_check.sh [--wheels DIR] [--out DIR] [--dry-run] [--budget-s S] [-- gpu_check.py args]
#
# For a machine with CUDA torch and nothing else of ours, and no internet:
# --wheels DIR (from scripts/fetch-gpu-wheels.sh) are unpacked into a private
# folder put first on PYTHONPATH, the source tree is linked in when framepack is
# not installed (benchmarks/gpu_env.py), then benchmarks/gpu_check.py measures
# and writes gpu-check.json and gpu-check.md into --out. It exits 0 even when a
# measurement fails (the error is in the JSON); --dry-run runs every code path
# on the CPU with tiny shapes, as the test suite does.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PYTHON:-python3}"
WHEELS="" OUT="$REPO/benchmarks/results/gpu-check" DRY="" BUDGET="480" EXTRA=()
while [ $# -gt 0 ]; do
    case "$1" in
        --wheels) WHEELS="$2"; shift 2 ;;
        --out) OUT="$2"; shift 2 ;;
        --dry-run) DRY="--dry-run"; shift ;;
        --budget-s) BUDGET="$2"; shift 2 ;;
        --) shift; EXTRA=("$@"); break ;;
        -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
DEPS="${FRAMEPACK_GPU_DEPS:-$(mktemp -d)/deps}"
"$PY" "$REPO/benchmarks/gpu_env.py" --target "$DEPS" ${WHEELS:+--wheels "$WHEELS"}
export PYTHONPATH="$DEPS${PYTHONPATH:+:$PYTHONPATH}"
# Numbers only from the weights this script builds: never reach for the hub.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
mkdir -p "$OUT"
"$PY" "$REPO/benchmarks/gpu_check.py" --out "$OUT" --budget-s "$BUDGET" $DRY "${EXTRA[@]}" 2>&1 | tee "$OUT/gpu-check.log"
