#!/usr/bin/env bash
# lead's GPU call 1 (not committed): kernels build/check/time, module .cuda() check, GPT-124M plans at world 1
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONPATH=. MESHPAR_OPS_CACHE=/tmp/mpops MESHPAR_ENABLE_KERNELS=all
O=${OUT:-/tmp/out}; mkdir -p $O
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
st() { local n=$1 t=$2; shift 2; local s=$SECONDS; timeout $t "$@" > $O/$n.log 2>&1; echo "== $n rc=$? wall=$((SECONDS-s))s"; }
st build 100 python -m meshpar.train.cli build-ops
st gputests 70 python -m pytest -q -m gpu tests/test_gpu_kernels.py
st kernels 100 python bench/kernels.py
st fusedloss 110 python bench/fused_loss.py
st modto 40 python - <<'PY'
import os, torch, torch.distributed as dist, meshpar as mp
from meshpar import P
os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29533")
dist.init_process_group("nccl"); torch.cuda.set_device(0)
mesh = mp.Mesh((1, 1), ("x", "y"))
m = torch.nn.Linear(8, 8)
m.weight = torch.nn.Parameter(mp.shard(torch.randn(8, 8), P("x", "y"), mesh))
m = m.cuda().bfloat16()
print("MODTO", type(m.weight).__name__, m.weight._local.device, m.weight.dtype, m.weight._local.dtype, m.weight.spec)
y = m(torch.randn(2, 8, device="cuda", dtype=torch.bfloat16)); y.float().sum().backward(); print("MODTO grad", m.weight.grad.spec, m.weight.grad._local.device)
PY
st gpt124m 150 python bench/gpt.py --modes dp,1d,2d --n-layer 12 --n-embd 768 --n-head 12 --seq 1024 --batch 16 --warmup 3 --steps 10 --out $O
echo "----- gputests"; grep -E "passed|failed|Error" $O/gputests.log | tail -6
echo "----- kernels"; tail -25 $O/kernels.log
echo "----- fusedloss"; tail -14 $O/fusedloss.log
echo "----- modto"; tail -4 $O/modto.log
echo "----- gpt124m"; tail -14 $O/gpt124m.log
echo "----- build"; tail -5 $O/build.log
