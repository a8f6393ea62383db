"""GPU (NCCL) versions of the core checks. Marked ``gpu``; they run on the device machine
(``make test-gpu``) and are skipped, with that reason, where no CUDA GPU is present."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

NGPU = torch.cuda.device_count() if torch.cuda.is_available() else 0
needs_gpus = pytest.mark.skipif(NGPU < 2, reason=f"needs >= 2 CUDA GPUs with NCCL (found {NGPU}); "
                                                 "run `make test-gpu` on the GPU machine")

SCRIPT = r'''
import os, torch, torch.distributed as dist, meshpar as mp
from meshpar import P
dist.init_process_group("nccl")
torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
n = dist.get_world_size()
mesh = mp.Mesh((2, n // 2), ("x", "y")) if n % 2 == 0 and n >= 4 else mp.Mesh((n,), ("x",))
dev = mesh.device
g = torch.Generator(device="cpu").manual_seed(0)
X = torch.randn(8 * n, 16 * n, dtype=torch.float64, generator=g).to(dev)
W = torch.randn(16 * n, 4 * n, dtype=torch.float64, generator=g).to(dev)
names = mesh.names
xs = mp.shard(X, P(names[0], names[-1]), mesh).requires_grad_()
ws = mp.shard(W, P(names[-1], None), mesh).requires_grad_()
y = xs @ ws
(mp.unshard(y) ** 2).sum().backward()
Xr, Wr = X.clone().requires_grad_(), W.clone().requires_grad_()
((Xr @ Wr) ** 2).sum().backward()
assert torch.allclose(mp.unshard(y), Xr @ Wr)
assert torch.allclose(mp.unshard(xs.grad), Xr.grad) and torch.allclose(mp.unshard(ws.grad), Wr.grad)
z = mp.reshard(y, P(None, names[0]))
assert torch.allclose(mp.unshard(z), Xr @ Wr)
for fn in (torch.tanh, lambda t: t.softmax(-1), lambda t: t.sum(0)):
    assert torch.allclose(mp.unshard(fn(xs)), fn(X))
if dist.get_rank() == 0:
    print("GPU CORE OK", n)
dist.destroy_process_group()
'''


@pytest.mark.gpu
@needs_gpus
def test_core_on_nccl(tmp_path):
    f = tmp_path / "gpu_core.py"
    f.write_text(SCRIPT)
    env = dict(os.environ, NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1")
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={NGPU}", str(f)],
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "GPU CORE OK" in out.stdout
