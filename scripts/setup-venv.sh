#!/usr/bin/env bash
# Create (or reuse) the virtual environment and install framepack into it.
# Sourced by scripts/render.sh and scripts/test.sh; FRAMEPACK_VENV picks the folder.
#
# torch goes in first and on its own: pip then keeps it when installing
# framepack, so a CPU machine never pulls a multi-GB CUDA build by accident.
# On a GPU machine `pip install torch==2.13.0` gets PyPI's CUDA build; to use
# another torch, install it into the venv first and set FRAMEPACK_TORCH=skip.
set -euo pipefail
VENV="${FRAMEPACK_VENV:-.venv}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
if [ "${FRAMEPACK_TORCH:-}" != "skip" ] && ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    "${PIP[@]}" "torch==${FRAMEPACK_TORCH_VERSION:-2.13.0}"
fi
"${PIP[@]}" -e ".${FRAMEPACK_EXTRAS:-[test]}"
export PATH="$VENV/bin:$PATH"
