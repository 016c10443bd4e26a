#!/usr/bin/env bash
# Set up ckptavg, train a tiny real model while saving checkpoints, average them and show what it did.
# Usage: scripts/demo.sh [examples folder, default examples/]
# The folder is replaced on each run, so the demo only ever removes a folder it made itself (it marks it with
# a .ckptavg-demo file) or an empty one: any other existing folder or file is refused before anything is done.
set -euo pipefail
GIVEN=${1:-}
cd "$(dirname "$0")/.."
case "$GIVEN" in
  "") EXAMPLES=examples ;;
  /*) EXAMPLES=$GIVEN ;;
  *) EXAMPLES="$OLDPWD/$GIVEN" ;;  # a relative folder is the caller's, not the repository's
esac
MARKER=.ckptavg-demo
refuse() {
  echo "demo: $EXAMPLES $1; the demo replaces its folder, so it leaves this one alone." >&2
  echo "demo: pass a new folder, e.g. scripts/demo.sh /tmp/ckptavg-demo, or remove it yourself." >&2
  exit 2
}
if [ -L "$EXAMPLES" ]; then
  refuse "is a symlink"
elif [ -e "$EXAMPLES" ] && [ ! -d "$EXAMPLES" ]; then
  refuse "exists and is not a folder"
elif [ -d "$EXAMPLES" ] && [ ! -f "$EXAMPLES/$MARKER" ] && [ -n "$(ls -A "$EXAMPLES")" ]; then
  refuse "exists and was not made by the demo (no $MARKER in it)"
fi
# the training loop saves with safetensors.torch, which needs numpy (the demo extra); ckptavg itself does not
EXTRAS=demo source scripts/setup_env.sh
CKPTAVG="$VENV/bin/ckptavg"
rm -rf "$EXAMPLES"
mkdir -p "$EXAMPLES"
echo "made by scripts/demo.sh, which replaces this folder on each run" > "$EXAMPLES/$MARKER"

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
