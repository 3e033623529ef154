#!/usr/bin/env bash
# Set up and run the test suite: bash scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The remote-cache tests start their own redis-server on a free loopback port (and skip without one).
if ! command -v redis-server >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
    SUDO=""
    if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1; then SUDO="sudo -n"; fi
    { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends redis-server; } \
        >/dev/null 2>&1 || echo "scripts/test.sh: could not install redis-server; the Redis tests will be skipped" >&2
fi
exec .venv/bin/python -m pytest -m "not stress and not slow" "$@"
