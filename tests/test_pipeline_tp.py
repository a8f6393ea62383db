"""Pipeline composed with tensor parallelism inside stages (ShardedTensor activations and weights)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as Fn

import meshpar
from meshpar import P
from meshpar.pipeline import Pipeline

H = 8


def _weights(n_blocks: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    return [torch.randn(H, H, generator=g, dtype=torch.float64) / H ** 0.5 for _ in range(n_blocks)]


class ColumnBlock(nn.Module):
    """x[b, H] (P()) -> tanh(x W^T)[b, H] sharded P(None, "tp"); W[out, in] is P("tp", None)."""

    def __init__(self, w: torch.Tensor, mesh):
        super().__init__()
        self.w = nn.Parameter(meshpar.shard(w, P("tp", None), mesh))

    def forward(self, x):
        return torch.tanh(Fn.linear(x, self.w))


class RowBlock(nn.Module):
    """y[b, H] (P(None, "tp")) -> y W^T [b, H] replicated P(); W[out, in] is P(None, "tp")."""

    def __init__(self, w: torch.Tensor, mesh):
        super().__init__()
        self.w = nn.Parameter(meshpar.shard(w, P(None, "tp"), mesh))

    def forward(self, y):
        return meshpar.reshard(Fn.linear(y, self.w), P())


def _blocks(mesh, ws):
    return [(ColumnBlock if i % 2 == 0 else RowBlock)(w, mesh) for i, w in enumerate(ws)]


def _dense(ws, x, t):
    params = [w.clone().requires_grad_() for w in ws]
    h = x
    for i, w in enumerate(params):
        h = torch.tanh(h @ w.T) if i % 2 == 0 else h @ w.T
    loss = ((h - t) ** 2).mean()
    loss.backward()
    return float(loss), [w.grad for w in params]


def mse(y, t):
    return ((y - t) ** 2).mean()


def _pipe_tp(mesh, schedule, m, chunks, partition):
    ws = _weights(4)
    g = torch.Generator().manual_seed(3)
    x, t = torch.randn(16, H, generator=g, dtype=torch.float64), torch.randn(16, H, generator=g, dtype=torch.float64)
    ref_loss, ref_grads = _dense(ws, x, t)
    nd = mesh.size("data") if "data" in mesh.names else 1
    d = mesh.coord("data") if "data" in mesh.names else 0
    pipe = Pipeline(_blocks(mesh, ws), mesh, mse, schedule=schedule, num_microbatches=m, chunks=chunks,
                    partition=partition)
    for _ in range(2):
        pipe.zero_grad(set_to_none=True)
        loss = pipe.step(x.chunk(nd)[d], t.chunk(nd)[d])
    checked = []
    for name, prm in pipe.named_block_parameters():
        i = int(name.split(".")[0])
        assert isinstance(prm.grad, meshpar.ShardedTensor) and prm.grad.spec == prm.spec
        torch.testing.assert_close(meshpar.unshard(prm.grad), ref_grads[i], rtol=1e-10, atol=1e-12)
        checked.append(i)
    return float(loss), ref_loss, checked


@pytest.mark.parametrize("shape,names,schedule,m,chunks,partition", [
    ((2, 2), ("pipe", "tp"), "1f1b", 4, 1, [1]),                       # boundary activation is P(None, "tp")
    ((2, 2, 2), ("pipe", "data", "tp"), "interleaved", 2, 2, "uniform"),  # boundaries alternate sharded / P()
])
def test_pipe_tp_equals_dense(pool, shape, names, schedule, m, chunks, partition):
    res = pool.run(_pipe_tp, shape, names, schedule, m, chunks, partition)
    ref_loss = res[0][1]
    assert sum(r[0] for r in res) / len(res) == pytest.approx(ref_loss, rel=1e-12)
    seen = {i for r in res for i in r[2]}
    assert seen == {0, 1, 2, 3}
