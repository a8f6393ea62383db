"""The README example: a 2x2 mesh on 4 CPU processes.

    torchrun --nproc-per-node 4 examples/quickstart.py
"""
import torch
import torch.distributed as dist

import meshpar as mp
from meshpar import P

dist.init_process_group("gloo")
torch.manual_seed(0)                                   # same global values on every rank
mesh = mp.Mesh((2, 2), ("x", "y"))                     # collective; spans ranks 0..3
X, W = torch.randn(8, 6), torch.randn(6, 4)
x = mp.shard(X, P("x", "y"), mesh)                     # global value in, local block kept
w = mp.shard(W, P("y", None), mesh)
y = x @ w                                              # contraction split over y on both -> unreduced over y
assert y.shape == (8, 4)                               # .shape is the GLOBAL shape
dense = mp.unshard(y)                                  # global tensor on every rank
z = mp.reshard(y, P(None, "y"))                        # reduce-scatter + all-to-all, chosen by the planner
assert torch.allclose(dense, X @ W, atol=1e-5) and torch.allclose(mp.unshard(z), X @ W, atol=1e-5)
if dist.get_rank() == 0:
    print("y.spec =", y.spec, " y.local.shape =", tuple(y.local.shape), " z.spec =", z.spec)
    print("matches dense:", True)
dist.destroy_process_group()
