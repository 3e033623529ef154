#!/bin/sh
# Build the service's read-only jitfreeze layer: precompile -> bundle -> import --into LAYER.
# Run by the Dockerfile at build time, and by tests/test_examples.py without Docker.
#   sh examples/image/build_layer.sh /opt/jf        (PYTHON: the interpreter, default python)
set -eu
LAYER=$1
PY=${PYTHON:-python}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
cd "$(dirname "$0")/../service"
# a fresh cache, so the bundle holds exactly what this build compiled; exit 1 (a fallback) fails the build
JITFREEZE_CACHE_DIR="$WORK/cache" JITFREEZE_CACHE_PATH= "$PY" -m jitfreeze precompile app:precompile_entry \
    --bundle "$WORK/model.jfb"
"$PY" -m jitfreeze import "$WORK/model.jfb" --into "$LAYER"
