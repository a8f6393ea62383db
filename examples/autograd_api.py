"""Autograd on sharded results: the dense API works on them, and custom Functions take ``meshpar.tracked``.

    torchrun --nproc-per-node 2 examples/autograd_api.py

Under autograd a ShardedTensor result keeps its graph on its block; it still answers like the dense
tensor (``requires_grad``, ``grad_fn``, ``is_leaf``) and ``backward``, ``torch.autograd.grad``, hooks
and ``retain_grad`` work on it. A ``torch.autograd.Function`` bypasses meshpar's dispatcher, so it is
given ``meshpar.tracked(h)``; without it the backward raises a ShardingError instead of losing the
gradient. Every gradient below is checked against the same computation on dense tensors.
"""
import torch
import torch.distributed as dist

import meshpar as mp
from meshpar import P


class Cube(torch.autograd.Function):
    """A user's own autograd Function: y = x ** 3 (it sees ShardedTensors; its ops are sharded)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x * x

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * 3 * x * x


dist.init_process_group("gloo")
torch.manual_seed(0)
mesh = mp.Mesh((2,), ("x",))
X, W = torch.randn(4, 6, dtype=torch.float64), torch.randn(6, 6, dtype=torch.float64)
x = mp.shard(X, P("x"), mesh).requires_grad_()       # rows split over x
w = mp.shard(W, P(), mesh).requires_grad_()          # replicated

h = torch.tanh(x @ w)                                # a computed result: its graph is on its block
assert h.requires_grad and not h.is_leaf and h.grad_fn is not None
h.retain_grad()
seen = []
h.register_hook(lambda g: seen.append(g.spec))       # the hook sees a ShardedTensor gradient
loss = Cube.apply(mp.tracked(h)).sum()               # a custom Function gets tracked(h)
loss.backward()

Xd, Wd = X.clone().requires_grad_(), W.clone().requires_grad_()
hd = torch.tanh(Xd @ Wd)
hd.retain_grad()
Cube.apply(hd).sum().backward()
for name, got, want in (("x", x.grad, Xd.grad), ("w", w.grad, Wd.grad), ("h", h.grad, hd.grad)):
    assert torch.allclose(mp.unshard(got), want), name

(gw,) = torch.autograd.grad((torch.sin(x @ w) * 2).sum(), [w])   # autograd.grad with a sharded root
assert torch.allclose(mp.unshard(gw), torch.autograd.grad((torch.sin(Xd @ Wd) * 2).sum(), [Wd])[0])

try:                                                 # the same Function without tracked: refused, not lost
    Cube.apply(torch.tanh(x @ w)).sum().backward()
    raise AssertionError("expected a ShardingError")
except mp.ShardingError as e:
    refusal = str(e).split(":")[0]

if dist.get_rank() == 0:
    print("x.grad, w.grad and h.grad match dense; hook saw a gradient laid out as", seen[0])
    print("without meshpar.tracked the backward refuses:", refusal)
dist.destroy_process_group()
