#!/usr/bin/env bash
# Set up everything and render a video: bash scripts/render.sh [--tiny] [framepack generate args]
#
# With the hub reachable this downloads the original weights (over 30 GB the
# first time) and renders examples/input.png. With --tiny, or when the hub
# cannot be reached, it renders with a tiny random-weight model instead and
# says so: the pipeline runs for real, but the video is noise.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup-venv.sh

tiny=0
if [ "${1:-}" = "--tiny" ]; then tiny=1; shift; fi
if [ "$tiny" = 0 ] && ! "$VENV/bin/python" - <<'PY'
import os, sys
import huggingface_hub
if os.environ.get("HF_HUB_OFFLINE") == "1":
    sys.exit(1)
try:
    huggingface_hub.HfApi().model_info("lllyasviel/FramePackI2V_HY", timeout=10)
except Exception as exc:
    print(f"render: the Hugging Face hub cannot be reached ({type(exc).__name__}).", file=sys.stderr)
    sys.exit(1)
PY
then
    echo "render: using a tiny random-weight model instead (the video will be noise)." >&2
    tiny=1
fi

mkdir -p outputs
if [ "$tiny" = 1 ]; then
    model=".cache/tiny-model"
    [ -d "$model" ] || framepack make-tiny-model "$model"
    exec framepack generate --image examples/input.png --prompt "The sun rises slowly over the hills" \
        --model "$model" --seconds 2 --steps 4 --resolution 256 --output outputs/demo-tiny.mp4 "$@"
fi
exec framepack generate --image examples/input.png --prompt "The sun rises slowly over the hills" \
    --output outputs/demo.mp4 "$@"
