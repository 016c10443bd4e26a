#!/usr/bin/env bash
# Issue 15: the GPU path checked on a machine with a CUDA GPU, in one command of under 8 minutes.
#
#   bash scripts/gpu_check.sh OUT_DIR [--quick]        (or GPU_CHECK_QUICK=1)
#
# Writes under OUT_DIR: gpu_check.log (everything printed), gpu_check.json (the figures), junit_cuda.xml and
# junit_core.xml. Steps:
#   1. the device: nvidia-smi, torch, CUDA and the machine;
#   2. the CUDA tests (pytest -m cuda tests/test_cuda.py), then the CPU suite's quick core (tests/test_average.py
#      tests/test_engine.py);
#   3. scripts/gpu_bench.py: N bf16 checkpoints made on a local disk, then in one run the cold and warm read
#      floors, `ckptavg average --device cuda` and `--device cpu` cold and warm, peak host RSS and GPU memory,
#      and each over the floor;
#   4. a two-rank torchrun run with --device cuda, inside step 3, its output compared with the CPU's.
# The project runs from this working tree (PYTHONPATH); nothing is installed. Without CUDA the CUDA parts are
# skipped and the rest runs. Exit status: 0 when every step passed (skips included), 1 otherwise.
# Environment: PYTHON (default: .venv/bin/python if it is there, else python3), GPU_CHECK_QUICK=1 (8 inputs of
# 0.05 GB, one round), GPU_CHECK_MODELS (8), GPU_CHECK_SIZE_GB (1), GPU_CHECK_REPEAT (2), GPU_CHECK_DATA (where
# the inputs are made; default: /tmp unless it is a tmpfs), GPU_CHECK_BUDGET_S (480: the whole script's time).
set -uo pipefail

OUT=${1:?usage: scripts/gpu_check.sh OUT_DIR [--quick]}
[[ "${2:-}" == "--quick" ]] && GPU_CHECK_QUICK=1
QUICK=${GPU_CHECK_QUICK:-0}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$ROOT" || exit 1
if [[ -z "${PYTHON:-}" ]]; then
    PYTHON=python3
    [[ -x .venv/bin/python ]] && PYTHON=.venv/bin/python
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if [[ "$QUICK" == 1 ]]; then
    MODELS=${GPU_CHECK_MODELS:-8} SIZE_GB=${GPU_CHECK_SIZE_GB:-0.05} REPEAT=${GPU_CHECK_REPEAT:-1}
else
    MODELS=${GPU_CHECK_MODELS:-8} SIZE_GB=${GPU_CHECK_SIZE_GB:-1} REPEAT=${GPU_CHECK_REPEAT:-2}
fi
BUDGET=${GPU_CHECK_BUDGET_S:-480}
PARTS=$(mktemp -d)
trap 'rm -rf "$PARTS"' EXIT
LOG="$OUT/gpu_check.log"
exec > >(tee "$LOG") 2>&1
TEE=$!
START=$SECONDS

# step NAME LIMIT_S COMMAND...: runs a step under a time limit (where `timeout` exists; a shell function runs
# without one), records its exit status
# and seconds in $PARTS/steps.tsv.
step() {
    local name=$1 limit=$2 began=$SECONDS rc
    shift 2
    echo
    echo "=== $name (limit ${limit}s, at $((SECONDS - START))s) ==="
    if [[ $(type -t "$1") != function ]] && command -v timeout >/dev/null; then
        timeout --signal=INT --kill-after=20 "$limit" "$@"
    else
        "$@"
    fi
    rc=$?
    echo "--- $name: exit $rc in $((SECONDS - began))s"
    printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - began))" >>"$PARTS/steps.tsv"
}

echo "gpu_check: $(date -u +%FT%TZ) in $ROOT, python $PYTHON, quick=$QUICK, out $OUT"

# 1. The device.
device() {
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi
        nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader >"$PARTS/nvidia-smi.csv"
    else
        echo "nvidia-smi: not found"
    fi
    uname -a
    "$PYTHON" - "$PARTS/device.json" <<'EOF'
import json, os, platform, sys, torch
info = {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(), "cpu_count": os.cpu_count(), "kernel": platform.release()}
try:
    info["memory_gb"] = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
except (ValueError, OSError):
    pass
if info["cuda_available"]:
    props = torch.cuda.get_device_properties(0)
    info.update(device_count=torch.cuda.device_count(), gpu=props.name, gpu_memory_gb=props.total_memory / 1e9,
                capability=f"{props.major}.{props.minor}", multiprocessors=props.multi_processor_count)
print(json.dumps(info, indent=1))
json.dump(info, open(sys.argv[1], "w"))
EOF
}
step device 60 device

# 2. The tests: every CUDA test (skipped without CUDA), then the CPU suite's quick core.
step cuda-tests 180 "$PYTHON" -m pytest -q -rs -p no:cacheprovider -m cuda tests/test_cuda.py --junitxml "$OUT/junit_cuda.xml"
step core-tests 90 "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_average.py tests/test_engine.py --junitxml "$OUT/junit_core.xml"

# 3 and 4. The benchmark (and its torchrun row), with the time left.
LEFT=$((BUDGET - (SECONDS - START) - 20))
(( LEFT < 60 )) && LEFT=60
BENCH_ARGS=(--json "$PARTS/bench.json" --models "$MODELS" --size-gb "$SIZE_GB" --repeat "$REPEAT" --deadline "$((LEFT - 40))")
[[ -n "${GPU_CHECK_DATA:-}" ]] && BENCH_ARGS+=(--dir "$GPU_CHECK_DATA")
step bench "$LEFT" "$PYTHON" scripts/gpu_bench.py "${BENCH_ARGS[@]}"

# The figures, in one JSON.
"$PYTHON" - "$PARTS" "$OUT" "$QUICK" "$((SECONDS - START))" <<'EOF'
import json, sys, time
import xml.etree.ElementTree as ET
from pathlib import Path

parts, out, quick, seconds = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "1", int(sys.argv[4])

def load(path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        return {"missing": f"{path.name}: {e}"}

def junit(path):
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError) as e:
        return {"missing": f"{path.name}: {e}"}
    suites = [root] if root.tag == "testsuite" else list(root)
    summary = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    summary["failed"] = [f"{c.get('classname')}::{c.get('name')}" for c in root.iter("testcase") if c.find("failure") is not None or c.find("error") is not None]
    reasons = {}
    for c in root.iter("testcase"):
        if (s := c.find("skipped")) is not None:
            reasons[s.get("message", "")] = reasons.get(s.get("message", ""), 0) + 1
    summary["skip_reasons"] = reasons
    return summary

steps = {}
if (parts / "steps.tsv").exists():
    for line in (parts / "steps.tsv").read_text().splitlines():
        name, rc, secs = line.split("\t")
        steps[name] = {"exit": int(rc), "seconds": int(secs), "ok": rc == "0", "timed_out": rc in ("124", "137")}
device = load(parts / "device.json")
if (parts / "nvidia-smi.csv").exists():
    device["nvidia_smi"] = (parts / "nvidia-smi.csv").read_text().strip()
else:
    device["nvidia_smi"] = "not found"
cuda = bool(device.get("cuda_available"))
tests = {"cuda": junit(out / "junit_cuda.xml"), "core": junit(out / "junit_core.xml")}
if not cuda:
    tests["cuda"]["note"] = "no CUDA device: every CUDA test skipped"
bench = load(parts / "bench.json")
result = {
    "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "quick": quick, "seconds": seconds,
    "ok": all(s["ok"] for s in steps.values()) and len(steps) == 4,
    "cuda": cuda if cuda else "skipped: no CUDA device", "steps": steps, "device": device, "tests": tests,
    "bench": bench, "torchrun": bench.get("torchrun", {"skipped": "the bench did not finish"}),
}
(out / "gpu_check.json").write_text(json.dumps(result, indent=1) + "\n")
print(f"\n=== summary ({seconds}s) ===")
print(json.dumps({"ok": result["ok"], "cuda": result["cuda"], "steps": steps, "tests": {k: {x: v.get(x) for x in ("tests", "failures", "errors", "skipped", "failed")} for k, v in tests.items()},
                  "targets": bench.get("targets"), "torchrun": result["torchrun"]}, indent=1))
sys.exit(0 if result["ok"] else 1)
EOF
rc=$?
echo "gpu_check: wrote $OUT/gpu_check.log and $OUT/gpu_check.json (exit $rc, $((SECONDS - START))s)"
exec >&- 2>&-
wait "$TEE"  # the log is complete before the script returns
exit $rc
