"""Sequence-parallel causal attention on 4 ranks: ring (load-balanced) and all-to-all, checked against
dense attention in float64, forward and backward.

    torchrun --nproc-per-node 4 examples/sequence_parallel/ring_attention.py

Runs on CPU with gloo (or on GPUs with NCCL when they are visible).
"""
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F

import meshpar as mp
from meshpar import P
from meshpar.ops import attention as A

backend = "nccl" if torch.cuda.is_available() else "gloo"
if backend == "nccl":
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
dist.init_process_group(backend)
sp = dist.get_world_size()
mesh = mp.Mesh((sp,), ("sp",))
dev = mesh.device

# global q, k, v [B, H, S, D], identical on every rank (same seed)
B, H, S, D = 2, 4, 32 * sp, 16
g = torch.Generator().manual_seed(0)
Q, K, V = (torch.randn(B, H, S, D, generator=g, dtype=torch.float64).to(dev) for _ in range(3))
# sequence (dim 2) split over "sp" in the load-balanced zigzag layout: rank r holds chunks r and
# 2*sp-1-r of 2*sp, so causal attention costs every rank the same. (P(None, None, "sp", None) is the
# contiguous layout: also exact, but the last rank then does 2*sp-1 times the work of the first.)
spec = P(None, None, mp.Zigzag("sp"), None)

# dense reference
q0, k0, v0 = (t.clone().requires_grad_() for t in (Q, K, V))
ref = F.scaled_dot_product_attention(q0, k0, v0, is_causal=True)
ref.square().sum().backward()

for mode in ("ring", "all_to_all"):
    q1, k1, v1 = (t.clone().requires_grad_() for t in (Q, K, V))
    with mp.CommCounter() as comm, A.sequence_parallel(mode=mode):
        q, k, v = (mp.shard(t, spec, mesh) for t in (q1, k1, v1))  # each rank keeps its two chunks
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # dispatches to ring / all-to-all
        out = mp.unshard(o)  # natural order again, global on every rank
        out.square().sum().backward()
    err = max((out - ref).abs().max().item(),
              *((a.grad - b.grad).abs().max().item() for a, b in ((q1, q0), (k1, k0), (v1, v0))))
    if mesh.rank == 0:
        print(f"{mode:>10}: out spec {o.spec}, local block {tuple(o._local.shape)}, "
              f"max |error| vs dense (out, dq, dk, dv) = {err:.2e}, "
              f"traffic over 'sp' (attention + unshard, fwd+bwd): {comm.bytes.get(('sp',), 0) / 1024:.0f} KiB received per rank")
    assert err < 1e-9, err

# the per-block view for model code: activations [B, S/sp, H*D] sharded on the sequence
x = torch.randn(B, S // sp, H * D, dtype=torch.float64, device=dev)
y = A.sp_attention_bsh(x, x, x, head_dim=D, mesh=mesh, axis="sp", causal=True,
                      balanced=True)  # local zigzag blocks in, local block out (blocks carry no spec: say the layout)
if mesh.rank == 0:
    print(f"sp_attention_bsh: local [B, S/sp, H*D] {tuple(x.shape)} -> {tuple(y.shape)}")
dist.destroy_process_group()
