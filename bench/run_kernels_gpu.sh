#!/usr/bin/env bash
# One GPU call for issue 15: build every cuda_ops kernel, run the GPU equality tests, then the three
# benchmarks (each checks before it times). Each step has its own time limit, so one slow step cannot
# take the others down; full logs and JSON go to $OUT (or bench/results); the short tables print last.
#   bash bench/run_kernels_gpu.sh        (from the repository root, on one H100/H200)
set -u
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
export OUT
export MESHPAR_ENABLE_KERNELS=${MESHPAR_ENABLE_KERNELS:-all}  # the CUDA kernels under test are opt-in until verified
export MESHPAR_OPS_CACHE=${MESHPAR_OPS_CACHE:-/tmp/meshpar_ops_cache}
export PYTHONPATH=.
PY=${PYTHON:-python3}
step() {  # step NAME SECONDS CMD...
  local name=$1 t=$2
  shift 2
  echo "== $name (limit ${t}s)"
  local s=$SECONDS
  timeout "$t" "$@" >"$OUT/$name.log" 2>&1
  echo "rc=$? wall=$((SECONDS - s))s" | tee -a "$OUT/$name.log"
}
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader > "$OUT/gpu.txt" 2>&1
step build 100 "$PY" -m meshpar.train.cli build-ops
step gpu_tests 70 "$PY" -m pytest -q -m gpu tests/test_gpu_kernels.py
step kernels 110 "$PY" bench/kernels.py
step fused_loss 130 "$PY" bench/fused_loss.py
step cpu_adamw 60 "$PY" bench/cpu_adamw.py
echo "===== summary ($(cat "$OUT/gpu.txt"))"
echo "--- build";      tail -n 6 "$OUT/build.log"
echo "--- gpu tests";  grep -E "passed|failed|error" "$OUT/gpu_tests.log" | tail -n 8
echo "--- kernels";    grep -A 30 "^kernel " "$OUT/kernels.log" | head -n 16; grep "^check\|^checks\|^note" "$OUT/kernels.log" | cut -c1-300
echo "--- fused loss"; grep "^check\|^note" "$OUT/fused_loss.log" | cut -c1-400; grep -A 12 "^vocab " "$OUT/fused_loss.log"
echo "--- cpu adamw";  grep "^cpu_adamw\|^check\|^note" "$OUT/cpu_adamw.log"; grep -A 10 "^variant " "$OUT/cpu_adamw.log"
