#!/usr/bin/env bash
# The system packages the test suite drives for real: Chromium (the web UI's
# browser tests, through Playwright, which never downloads a browser here) and
# PostgreSQL (the render service's queue on a shared database). Installed with
# apt when missing and this runs as root; otherwise the tests that need them
# are skipped with the reason, and this says what to install.
# Sourced by scripts/test.sh; FRAMEPACK_SYSTEM_DEPS=skip leaves the system alone.
if [ "${FRAMEPACK_SYSTEM_DEPS:-}" != "skip" ]; then
    _need=()
    command -v chromium >/dev/null 2>&1 || _need+=(chromium)
    compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || _need+=(postgresql)
    if [ ${#_need[@]} -gt 0 ]; then
        if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
            echo "installing ${_need[*]} (apt)" >&2
            apt-get update -qq >/dev/null
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${_need[@]}" >/dev/null
        else
            echo "note: ${_need[*]} not installed; their tests will be skipped (apt-get install ${_need[*]})" >&2
        fi
    fi
    unset _need
fi
