#!/usr/bin/env bash
# Set up a virtual environment with the test and dev extras, check formatting and lint, and run the test suite.
# Usage: scripts/test.sh [pytest arguments]
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=test,dev source scripts/setup_env.sh
# ruff (pinned in the dev extra) over ckptavg/, tests/ and scripts/, at the line length of pyproject.toml.
"$VENV/bin/ruff" format --check .
"$VENV/bin/ruff" check .
# timm makes real CheckpointSaver/ModelEmaV3 checkpoints in the tests. Its dependencies would pull torchvision
# (a CUDA build that does not load beside the CPU torch), so it comes alone; the tests load the parts they use.
"$VENV/bin/python" -m pip install -q --no-deps -c "$VENV/ckptavg-constraints.txt" "timm==1.0.31"
"$VENV/bin/python" -m pytest -q "$@"
