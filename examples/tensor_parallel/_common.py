"""Shared set-up for the tensor-parallel examples (torchrun, gloo on CPU or NCCL on GPU)."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

import meshpar as mp


def init() -> None:
    """Join the torchrun world: NCCL when GPUs are visible, else gloo on CPU."""
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend)


def linear_check(mesh: mp.Mesh, xspec: mp.P, wspec: mp.P, bspec: mp.P, shape=(8, 4, 16, 32), seed: int = 0):
    """``y = x @ w + b`` on ShardedTensors vs the dense computation in float64; returns (y, max error)."""
    b, s, h, n = shape
    g = torch.Generator().manual_seed(seed)
    X, W, B = (torch.randn(*sz, generator=g, dtype=torch.float64) for sz in ((b, s, h), (h, n), (n,)))
    x = mp.shard(X, xspec, mesh).requires_grad_()
    w = mp.shard(W, wspec, mesh).requires_grad_()
    bias = mp.shard(B, bspec, mesh).requires_grad_()
    y = x @ w + bias
    (mp.unshard(y) ** 2).sum().backward()
    Xd, Wd, Bd = (t.clone().requires_grad_() for t in (X, W, B))
    ((Xd @ Wd + Bd) ** 2).sum().backward()
    with torch.no_grad():
        err = max(float((mp.unshard(a) - d).abs().max()) for a, d in
                  ((y, Xd @ Wd + Bd), (x.grad, Xd.grad), (w.grad, Wd.grad), (bias.grad, Bd.grad)))
    return y, err


def report(name: str, y, err: float) -> None:
    if dist.get_rank() == 0:
        print(f"{name}: y{tuple(y.shape)} spec {y.spec}; max |error| vs dense (forward, dX, dW, dbias) = {err:.2e}")
    assert err < 1e-9, err
    dist.destroy_process_group()
