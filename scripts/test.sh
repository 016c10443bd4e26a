#!/usr/bin/env bash
# Set up a virtual environment with the test extra and run the whole test suite.
# Usage: scripts/test.sh [pytest arguments]
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=test source scripts/setup_env.sh
"$VENV/bin/python" -m pytest -q "$@"
