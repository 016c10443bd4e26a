#!/usr/bin/env bash
# Set up ckptavg, train a tiny real model while saving checkpoints, average them and show what it did.
# Usage: scripts/demo.sh [examples folder, default examples/]
set -euo pipefail
cd "$(dirname "$0")/.."
# the training loop saves with safetensors.torch, which needs numpy (the demo extra); ckptavg itself does not
EXTRAS=demo source scripts/setup_env.sh
EXAMPLES=${1:-examples}
CKPTAVG="$VENV/bin/ckptavg"
rm -rf "$EXAMPLES"

echo "== 1. train a tiny character-level model (about 15 s), saving checkpoint-N/ folders"
"$VENV/bin/python" scripts/make_examples.py train "$EXAMPLES/run"
ls "$EXAMPLES/run"

echo "== 2. select: the last 4 checkpoints, and the 3 best by eval_loss (metrics from trainer_state.json)"
LAST4=$("$CKPTAVG" select "$EXAMPLES"/run/checkpoint-* --last 4)
echo "$LAST4"
"$CKPTAVG" select "$EXAMPLES"/run/checkpoint-* --metric eval_loss --top-k 3 --json \
  | "$VENV/bin/python" -c "import json, sys; [print(c['step'], c['metrics'].get('eval_loss'), 'chosen' if c['chosen'] else '', '; '.join(c['why'])) for c in json.load(sys.stdin)['candidates']]"
"$CKPTAVG" average $LAST4 -o "$EXAMPLES/merged" --dry-run

echo "== 3. average them, reading the output back from the disk to check it (--verify)"
"$CKPTAVG" average $LAST4 -o "$EXAMPLES/merged" --verify
ls -l "$EXAMPLES/merged"

echo "== 4. an EMA over all checkpoints into one bf16 file, summary as JSON"
"$CKPTAVG" average "$EXAMPLES"/run/checkpoint-* --ema 0.5 --dtype bf16 -o "$EXAMPLES/ema.safetensors" --json \
  | "$VENV/bin/python" -c "import json, sys; r = json.load(sys.stdin); print({k: r[k] for k in ('strategy', 'order', 'tensors', 'parameters', 'output_dtypes', 'bytes_written')})"

echo "== 5. inspect the newest checkpoint, and how far the average moved from it"
NEWEST=$(echo "$LAST4" | tail -1)
"$CKPTAVG" inspect "$NEWEST"
"$CKPTAVG" inspect "$EXAMPLES/merged" --check
"$CKPTAVG" inspect "$NEWEST" --diff "$EXAMPLES/merged" | tail -4

echo "== 6. export the newest training checkpoint as a bf16 model (optimizer and RNG state left behind)"
"$CKPTAVG" export "$NEWEST" --dtype bf16 -o "$EXAMPLES/exported"

echo "== 7. validation loss: the newest checkpoint against the averages"
"$VENV/bin/python" scripts/make_examples.py eval "$NEWEST" "$EXAMPLES/merged" "$EXAMPLES/ema.safetensors" "$EXAMPLES/exported"
