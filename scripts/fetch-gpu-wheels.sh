#!/usr/bin/env bash
# Download the wheels benchmarks/gpu_check.sh needs on a GPU machine that has
# CUDA torch, transformers and triton but nothing else of ours and no internet:
#
#   bash scripts/fetch-gpu-wheels.sh DIR      # then carry DIR (at most 64 MiB) to the machine
#
# For CPython 3.12 (FRAMEPACK_GPU_PYTHON) on manylinux x86_64, without dependencies (the machine has
# torch's and transformers'): diffusers at the version framepack is tested
# with, bitsandbytes (NF4), sageattention (the triton kernel), and the small
# pure-Python packages framepack and diffusers import. gpu_env.py unpacks only
# those the machine lacks. Prints the total size, which must stay under 64 MiB.
set -euo pipefail
DIR="${1:?usage: fetch-gpu-wheels.sh DIR}"
PY="${PYTHON:-python3}"
TARGET_PY="${FRAMEPACK_GPU_PYTHON:-3.12}"  # the GPU machine's Python
DIFFUSERS="${FRAMEPACK_GPU_DIFFUSERS:-$("$PY" -c 'import diffusers; print(diffusers.__version__)' 2>/dev/null || echo 0.42.1)}"
mkdir -p "$DIR"
"$PY" -m pip download --quiet --disable-pip-version-check --only-binary=:all: --no-deps -d "$DIR" \
    --python-version "$TARGET_PY" --implementation cp --abi "cp${TARGET_PY/./}" --abi abi3 --abi none \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform any \
    "diffusers==$DIFFUSERS" "bitsandbytes>=0.46" "sageattention>=1.0.6" \
    pluggy einops accelerate importlib_metadata zipp pillow requests urllib3 idna certifi charset_normalizer
BYTES=$(du -cb "$DIR"/*.whl | tail -1 | cut -f1)
echo "$(ls "$DIR"/*.whl | wc -l) wheels, $((BYTES / 1048576)) MiB in $DIR"
if [ "$BYTES" -gt $((64 * 1048576)) ]; then
    echo "fetch-gpu-wheels.sh: more than 64 MiB: one device call cannot carry them" >&2
    exit 1
fi
