#!/usr/bin/env bash
# Set up ckptavg, train a tiny real model while saving checkpoints, average them and show what it did.
# Usage: scripts/demo.sh [examples folder, default examples/]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
EXAMPLES=${1:-examples}
CKPTAVG="$VENV/bin/ckptavg"
rm -rf "$EXAMPLES"

echo "== 1. train a tiny character-level model (about 15 s), saving checkpoint-N/ folders"
"$VENV/bin/python" scripts/make_examples.py train "$EXAMPLES/run"
ls "$EXAMPLES/run"

echo "== 2. plan the average of the last 4 checkpoints (nothing written)"
LAST4=$(ls -d "$EXAMPLES"/run/checkpoint-* | sort -t- -k2 -n | tail -4)
"$CKPTAVG" average $LAST4 -o "$EXAMPLES/merged" --dry-run

echo "== 3. average them"
"$CKPTAVG" average $LAST4 -o "$EXAMPLES/merged"
ls -l "$EXAMPLES/merged"

echo "== 4. an EMA over all checkpoints into one bf16 file, summary as JSON"
"$CKPTAVG" average "$EXAMPLES"/run/checkpoint-* --ema 0.5 --dtype bf16 -o "$EXAMPLES/ema.safetensors" --json \
  | "$VENV/bin/python" -c "import json, sys; r = json.load(sys.stdin); print({k: r[k] for k in ('strategy', 'order', 'tensors', 'parameters', 'output_dtypes', 'bytes_written')})"

echo "== 5. validation loss: the newest checkpoint against the averages"
"$VENV/bin/python" scripts/make_examples.py eval $(echo "$LAST4" | tail -1) "$EXAMPLES/merged" "$EXAMPLES/ema.safetensors"
