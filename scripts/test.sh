#!/usr/bin/env bash
# Set up and run the test suite: bash scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -m "not stress and not slow" "$@"
