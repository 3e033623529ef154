#!/usr/bin/env bash
# Set up and run the demo: a first (cold) process compiles, a second (warm) one loads from the cache.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python examples/demo.py "$@"
