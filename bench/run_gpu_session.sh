#!/usr/bin/env bash
# One GPU call that runs named steps, each under its own time limit, logs to $OUT/logs/<step>.log
# and packs them into $OUT/logs.tgz (the device tool returns at most 8 files).
#   bash bench/run_gpu_session.sh STEP...   steps: smi build gputests module gpt124m gpt1b offcheck off8b kernels
set -u
OUT=${OUT:-bench/results}
TOP=$OUT; L=$TOP/logs; mkdir -p "$L"
export OUT=$L  # every script writes its JSON beside the logs: one archive comes back
export PYTHONPATH=. PYTHONUNBUFFERED=1 MESHPAR_OPS_CACHE=${MESHPAR_OPS_CACHE:-/tmp/meshpar_ops_cache}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
PY=${PYTHON:-python3}
step() {  # step NAME SECONDS CMD...
  local name=$1 t=$2; shift 2
  echo "== $name (limit ${t}s)"
  local s=$SECONDS
  timeout "$t" "$@" >"$L/$name.log" 2>&1
  local rc=$?
  echo "rc=$rc wall=$((SECONDS - s))s" | tee -a "$L/$name.log"
  tar -czf "$TOP/logs.tgz" -C "$TOP" logs   # after every step: a later step killed by the call's limit loses nothing
  grep -E "^ *(dense|dp|1d|2d|2\.5d|3d|sp|fsdp2)[^a-z]|passed|failed|error|Error|step time|tok/s|check|MODULE|SYNCS|meshpar |largest|^  [0-9]+x at|^    " "$L/$name.log" | tail -n 25 | cut -c1-300
}
for s in "$@"; do
  case $s in
    smi) step smi 30 bash -c "nvidia-smi; $PY -c 'import torch;print(torch.__version__, torch.cuda.get_device_name())'" ;;
    build) step build 120 env MESHPAR_ENABLE_KERNELS=all "$PY" -m meshpar.train.cli build-ops ;;
    gputests) step gputests 150 env MESHPAR_ENABLE_KERNELS=all "$PY" -m pytest -q -x -m gpu tests/test_gpu.py tests/test_gpu_kernels.py ;;
    gpt124m) step gpt124m 200 "$PY" bench/gpt.py --n-layer 12 --n-embd 768 --n-head 12 --seq 1024 --batch 16 \
               --modes ${GPT_MODES:-dense,dp,1d,2d,3d} --out "$L" ;;
    gpt1b) step gpt1b 300 "$PY" bench/gpt.py --batch 8 --modes ${GPT_MODES:-dense,1d,2d} --out "$L" ;;
    off8b) step off8b 200 "$PY" bench/offload.py --no-check --sizes "" --largest 8.5b --batch ${OFF_BATCH:-16} \
             --warmup 2 --iters 3 --timeout 190 --out "$L" ;;
    module) step module 100 "$PY" tests/gpu_module_script.py dense,dp,1d,2d,2.5d,3d warn ;;
    offcheck) step offcheck 150 "$PY" bench/offload.py --run check --out "$L" ;;
    kernels) step build 120 env MESHPAR_ENABLE_KERNELS=all "$PY" -m meshpar.train.cli build-ops
             step kernels 200 env MESHPAR_ENABLE_KERNELS=all "$PY" bench/kernels.py
             step fused_loss 150 env MESHPAR_ENABLE_KERNELS=all "$PY" bench/fused_loss.py
             step cpu_adamw 70 env MESHPAR_ENABLE_KERNELS=all "$PY" bench/cpu_adamw.py ;;
    *) echo "unknown step $s" ;;
  esac
done
rm -rf "$L"
