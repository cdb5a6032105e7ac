#!/usr/bin/env bash
# Every GPU check in one script, for a lent GPU machine (torch + Triton + timm; no mm packages needed).
#   bash tools/gpu_checks.sh                        # on the GPU machine; results under ${OUT:-work_dirs/gpu}
#   GPU_CHECKS_SMOKE=1 bash tools/gpu_checks.sh     # on CPU: the same steps at tiny sizes (tests this script)
#
# Steps, most needed first: the kernel check (nothing is timed if it fails); the depthwise unit in bf16 at 224 and
# 512 (the issue's unit target); the training step with bf16 autocast (the backbone target); the Triton tile sweep;
# the fp32 backbone; the unit again at 800x1344, 224 and 512 in every dtype. A lent machine gives one command at most
# 10 minutes and sends back at most 8 files, so: each step has a time limit, all of them within GPU_CHECKS_BUDGET
# seconds (default 480; CHECK_LIMIT, default 150, caps the kernel check); each benchmark rewrites its JSON after
# every row, so a step stopped at its limit keeps what it measured (its JSON then says "complete": false); and the
# results are 6 JSON files plus one log of everything, which ends with tools/gpu_report.py's summary: the issue's
# GPU targets, met or not.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-work_dirs/gpu}
BUDGET=${GPU_CHECKS_BUDGET:-480}
SMOKE=${GPU_CHECKS_SMOKE:-0}
mkdir -p "$OUT"
LOG="$OUT/gpu_checks.log"
: > "$LOG"
PY=${PY:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
START=$SECONDS

# step NAME LIMIT_S CMD...: run CMD under min(LIMIT_S, what is left of the budget), appending its output to the log
step() {
    local name=$1 limit=$2 left t0 rc
    shift 2
    left=$((BUDGET - (SECONDS - START)))
    ((left < limit)) && limit=$left
    if ((limit < 5)); then
        echo "== $name: not run, the ${BUDGET}s budget is spent" | tee -a "$LOG"
        return 124
    fi
    echo "== $name (limit ${limit}s): $*" | tee -a "$LOG"
    t0=$SECONDS
    timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$LOG"  # (killed 10 s after the TERM if it has not stopped)
    rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc after $((SECONDS - t0))s$([ "$rc" -eq 124 ] && echo ' (time limit)')" | tee -a "$LOG"
    return "$rc"
}

if [ "$SMOKE" = 1 ]; then
    export TRITON_INTERPRET=1
    CHECK=(--tiny --batch 1 --dtypes float32 bfloat16)
    UNIT=(--sizes 64 --batch 1 --dtypes bfloat16 --phases fwd_bwd eval_sum --repeats 1)
    UNIT_ALL=(--sizes 64 --batch 1 --dtypes float32 --phases forward --repeats 1)
    BACKBONE=(slak_t convnext_tiny --sizes 64 --batch 1 --train --repeats 1)
    SWEEP=(--tiny --sizes 224 --stages 1)
else
    $PY -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" || {
        echo "gpu_checks.sh: no CUDA device visible to torch; run it on a GPU machine (CPU benchmarks: make bench;" \
             "GPU_CHECKS_SMOKE=1 tests this script on CPU)"
        exit 1
    }
    CHECK=()
    UNIT=(--sizes 224 512 --dtypes bfloat16 --repeats 10)
    UNIT_ALL=(--sizes 800x1344 224 512 --dtypes bfloat16 float16 float32 --repeats 10)
    BACKBONE=(--sizes 224 512 --train --repeats 10)
    SWEEP=()
fi
{
    if command -v nvidia-smi > /dev/null; then nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    else echo "(no nvidia-smi)"; fi
    $PY -c "import sys, torch, triton; print('python', sys.version.split()[0], '| torch', torch.__version__,
          '| triton', triton.__version__)"
} | tee -a "$LOG"

step "kernel check" "${CHECK_LIMIT:-150}" $PY tools/check_triton_gpu.py "${CHECK[@]}" --json "$OUT/triton_check.json"
rc=$?
if [ $rc = 124 ] && $PY -c "import json, sys; r = json.load(open(sys.argv[1]))
sys.exit(0 if r['rows'] and not r['failed'] else 1)" "$OUT/triton_check.json" 2> /dev/null; then
    echo "kernel check cut short at its time limit; every case it finished passed, so the benchmarks run" |
        tee -a "$LOG"
elif [ $rc != 0 ]; then
    echo "kernel check failed: no benchmarks" | tee -a "$LOG"
    exit 1
fi
failed=0
step "unit, bf16" 120 $PY tools/benchmark_dwconv.py "${UNIT[@]}" --json "$OUT/dwconv_bf16.json" || failed=1
step "backbone, bf16 autocast" 90 $PY tools/benchmark.py "${BACKBONE[@]}" --amp --json "$OUT/backbone_amp.json" ||
    failed=1
step "tile sweep" 90 $PY tools/sweep_triton_tiles.py "${SWEEP[@]}" --json "$OUT/triton_tiles.json" || failed=1
step "backbone, fp32" 60 $PY tools/benchmark.py "${BACKBONE[@]}" --json "$OUT/backbone_fp32.json" || failed=1
step "unit, all dtypes" 600 $PY tools/benchmark_dwconv.py "${UNIT_ALL[@]}" --json "$OUT/dwconv_all.json" || failed=1
$PY tools/gpu_report.py "$OUT" 2>&1 | tee -a "$LOG"  # the targets, met or not (from the JSON files above)
echo "gpu_checks.sh: $((SECONDS - START))s in all; $([ $failed = 0 ] && echo 'every step finished' ||
    echo 'some step failed or hit its limit (see the == lines)')" | tee -a "$LOG"
exit $failed
