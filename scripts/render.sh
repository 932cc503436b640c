#!/usr/bin/env bash
# Set up everything and render a video: bash scripts/render.sh [--tiny] [framepack generate args]
#
# Writes outputs/demo.mp4 from examples/input.png. With the hub reachable this
# downloads the original weights (over 30 GB the first time). With --tiny, or
# when the hub cannot be reached, it renders with a tiny random-weight model
# instead: the pipeline runs for real, but the video is noise. Either way it
# says which model it used, before it starts and again when it is done.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup-venv.sh

tiny=0
if [ "${1:-}" = "--tiny" ]; then tiny=1; why="--tiny"; shift; fi
if [ "$tiny" = 0 ]; then
    hub=0
    "$VENV/bin/python" - <<'PY' || hub=$?
import os, sys
import huggingface_hub
if os.environ.get("HF_HUB_OFFLINE") == "1":
    sys.exit(3)
try:
    huggingface_hub.HfApi().model_info("lllyasviel/FramePackI2V_HY", timeout=10)
except Exception as exc:
    print(f"render: the Hugging Face hub cannot be reached ({type(exc).__name__}).", file=sys.stderr)
    sys.exit(1)
PY
    if [ "$hub" = 3 ]; then tiny=1; why="HF_HUB_OFFLINE=1"
    elif [ "$hub" != 0 ]; then tiny=1; why="the hub cannot be reached"
    fi
fi

# The output the README names; a later --output among the extra arguments wins.
output="outputs/demo.mp4"
prev=""
for arg in "$@"; do
    if [ "$prev" = "--output" ]; then output="$arg"; fi
    case "$arg" in --output=*) output="${arg#--output=}" ;; esac
    prev="$arg"
done

mkdir -p outputs
args=(--image examples/input.png --prompt "The sun rises slowly over the hills" --output outputs/demo.mp4)
if [ "$tiny" = 1 ]; then
    model=".cache/tiny-model"
    used="the tiny random-weight model in $model ($why; the video is noise)"
    [ -d "$model" ] || framepack make-tiny-model "$model"
    args+=(--model "$model" --seconds 2 --steps 4 --resolution 256)
else
    used="the original FramePack weights from the Hugging Face hub"
fi
echo "render: model: $used" >&2
if framepack generate "${args[@]}" "$@"; then
    echo "render: wrote $output with $used" >&2
else
    status=$?
    echo "render: framepack generate failed (exit $status) with $used" >&2
    exit "$status"
fi
