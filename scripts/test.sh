#!/usr/bin/env bash
# Set up everything and run the test suite: bash scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup-venv.sh
source scripts/system-deps.sh
# Every core runs tests (pytest-xdist; one test file per worker, so a file's
# module fixtures, e.g. a server, start once) with one torch thread each: the
# tiny model's ops are too small to gain from more, and on a 2-core machine two
# workers of two threads each fight over the cores. Together: about 17 minutes
# here instead of 40. FRAMEPACK_TEST_WORKERS=0 runs them in this process.
# The 15 slowest tests are listed at the end, to see where the time goes.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec "$VENV/bin/python" -m pytest -n "${FRAMEPACK_TEST_WORKERS:-auto}" --dist loadfile --durations=15 "$@"
