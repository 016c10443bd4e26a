# Sourced by demo.sh and test.sh: a virtual environment with ckptavg installed, without ever pulling a
# CUDA build of torch when a working torch is already there.
#   VENV=path   where the environment lives (default .venv)
#   EXTRAS=test install the test extra too (a comma list: EXTRAS=test,dev)
#   TORCH_SPEC  the torch to install when none works yet (default torch==2.13.0: a local CPU wheel here)
set -euo pipefail
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
export PIP_DISABLE_PIP_VERSION_CHECK=1

if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating $VENV" >&2
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  echo "setup: installing $TORCH_SPEC" >&2
  "$PY" -m pip install -q "$TORCH_SPEC"
fi
# Pin whatever torch works now, so no dependency resolution can swap it for another build.
TORCH_VERSION=$("$PY" -W ignore -c "import torch; print(torch.__version__)")
CONSTRAINTS="$VENV/ckptavg-constraints.txt"
echo "torch==${TORCH_VERSION}" > "$CONSTRAINTS"
TARGET="."
[ -n "${EXTRAS:-}" ] && TARGET=".[${EXTRAS}]"
echo "setup: installing ckptavg${EXTRAS:+[$EXTRAS]} (torch pinned to $TORCH_VERSION)" >&2
"$PY" -m pip install -q -c "$CONSTRAINTS" -e "$TARGET"
