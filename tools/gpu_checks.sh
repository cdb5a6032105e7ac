#!/usr/bin/env bash
# Every GPU check in one script, for a lent GPU machine (torch + Triton + timm; no mm packages needed):
# kernel correctness first, then the depthwise-unit and backbone benchmarks, then the Triton tile sizes (chosen without
# a GPU) timed against each other. Results go under ${OUT:-work_dirs/gpu}.
#   bash tools/gpu_checks.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-work_dirs/gpu}
mkdir -p "$OUT"
PY=${PY:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python)}
$PY -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" ||
    { echo "gpu_checks.sh: no CUDA device visible to torch; run it on a GPU machine (CPU benchmarks: make bench)"; exit 1; }
nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/gpu.txt" 2>&1
$PY tools/check_triton_gpu.py --json "$OUT/triton_check.json" 2>&1 | tee "$OUT/triton_check.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || { echo "kernel check failed: no benchmarks"; exit 1; }
$PY tools/benchmark_dwconv.py --sizes 224 512 800x1344 --dtypes bfloat16 float16 float32 --repeats 10 \
    --json "$OUT/dwconv.json" 2>&1 | tee "$OUT/dwconv.log"
$PY tools/benchmark.py --sizes 224 512 --train --repeats 10 --json "$OUT/backbone_fp32.json" 2>&1 | tee "$OUT/backbone_fp32.log"
$PY tools/benchmark.py --sizes 224 512 --train --amp --repeats 10 --json "$OUT/backbone_amp.json" 2>&1 | tee "$OUT/backbone_amp.log"
$PY tools/sweep_triton_tiles.py --json "$OUT/triton_tiles.json" 2>&1 | tee "$OUT/triton_tiles.log"
