#!/usr/bin/env bash
# Set up everything and run the test suite: bash scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup-venv.sh
source scripts/system-deps.sh
exec "$VENV/bin/python" -m pytest "$@"
