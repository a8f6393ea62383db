"""shard_map with JAX-style collectives by axis name: a row-parallel MLP layer and a ring shift.

    torchrun --nproc-per-node 4 examples/shard_map_collectives.py

Inside ``f`` the blocks are plain tensors and the collectives name mesh axes only; the mesh is the
enclosing shard_map's. Everything is checked against the dense computation (values and gradients).
"""
import torch
import torch.distributed as dist

import meshpar as mp
from meshpar import P

dist.init_process_group("gloo")
torch.manual_seed(0)                                   # same global values on every rank
mesh = mp.Mesh((2, 2), ("data", "tp"))
X = torch.randn(8, 6, dtype=torch.float64, requires_grad=True)
W1 = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
W2 = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)


def mlp(x, w1, w2):
    """x [8/data, 6], w1 [6, 4/tp] (column-parallel), w2 [4/tp, 3] (row-parallel)."""
    # a value replicated over an axis but used per rank of it gets pvary: its gradient is the sum
    # of the ranks' shares (x over tp; the weights over data)
    w1, w2 = mp.pvary(w1, "data"), mp.pvary(w2, "data")
    h = torch.relu(mp.pvary(x, "tp") @ w1)
    return mp.psum(h @ w2, "tp")                       # partial sums over tp -> replicated over tp


f = mp.shard_map(mlp, mesh, in_specs=(P("data"), P(None, "tp"), P("tp")), out_specs=P("data"))
y = f(X, W1, W2)
(mp.unshard(y) ** 2).sum().backward()
grads = [t.grad.clone() for t in (X, W1, W2)]
for t in (X, W1, W2):
    t.grad = None
((torch.relu(X @ W1) @ W2) ** 2).sum().backward()
assert torch.allclose(mp.unshard(y), torch.relu(X @ W1) @ W2)
assert all(torch.allclose(a, t.grad) for a, t in zip(grads, (X, W1, W2)))


def shift(x):
    """Each data rank sends its block to the next one (a ring), then gathers the whole ring."""
    n = mp.axis_size("data")
    moved = mp.ppermute(x, "data", [(i, (i + 1) % n) for i in range(n)])
    return mp.all_gather(moved, "data", dim=0, tiled=True)


ring = mp.shard_map(shift, mesh, in_specs=(P("data"),), out_specs=P())(X.detach())
assert torch.equal(mp.unshard(ring), torch.roll(X.detach(), 4, dims=0))

# out_specs=P() promises equal blocks on every rank; shard_map checks it (check_rep=True by default)
try:
    mp.shard_map(lambda x: x, mesh, in_specs=(P("data"),), out_specs=P())(X.detach())
except mp.ShardingError as e:
    if dist.get_rank() == 0:
        print("caught:", str(e).split(".")[0])

if dist.get_rank() == 0:
    print("row-parallel MLP and ring shift match dense (values and gradients)")
dist.destroy_process_group()
