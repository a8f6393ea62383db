"""Pipelined training steps on gloo equal the non-pipelined model in float64."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from meshpar.errors import ShardingError
from meshpar.pipeline import Pipeline

HIDDEN = 6


class Block(nn.Module):
    """x[b, h] -> tanh(x W + b) + x."""

    def __init__(self, h: int):
        super().__init__()
        self.lin = nn.Linear(h, h)

    def forward(self, x):
        return torch.tanh(self.lin(x)) + x


def make_blocks(n: int, seed: int = 0) -> list[nn.Module]:
    torch.manual_seed(seed)
    return [Block(HIDDEN).double() for _ in range(n)]


def mse(y, t):
    return ((y - t) ** 2).mean()


def reference(n_blocks: int, x: torch.Tensor, t: torch.Tensor):
    model = nn.Sequential(*make_blocks(n_blocks))
    loss = mse(model(x), t)
    loss.backward()
    return loss.detach(), {k: p.grad for k, p in model.named_parameters()}


def batch(n: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, HIDDEN, generator=g, dtype=torch.float64),
            torch.randn(n, HIDDEN, generator=g, dtype=torch.float64))


def _equal_dense(mesh, cases, n_blocks, global_batch):
    """Run each (schedule, microbatches, chunks, partition) case; compare with the dense model."""
    x, t = batch(global_batch)
    ref_loss, ref_grads = reference(n_blocks, x, t)
    nd = mesh.size("data") if "data" in mesh.names else 1
    d = mesh.coord("data") if "data" in mesh.names else 0
    xs, ts = x.chunk(nd)[d], t.chunk(nd)[d]
    out = []
    for sched, m, chunks, part in cases:
        pipe = Pipeline(make_blocks(n_blocks), mesh, mse, schedule=sched, num_microbatches=m, chunks=chunks,
                        partition=part)
        for step in range(2):  # the second step uses cached shapes and early receives
            pipe.zero_grad(set_to_none=True)
            loss = pipe.step(xs, ts)
        n_params = 0
        for name, prm in pipe.named_block_parameters():
            torch.testing.assert_close(prm.grad, ref_grads[name], rtol=1e-10, atol=1e-12,
                                       msg=lambda s: f"{sched} m={m} v={chunks} grad {name}: {s}")
            n_params += 1
        out.append((float(loss), n_params))
    return out, float(ref_loss)


CASES_2 = [(s, m, 1, "uniform") for s in ("gpipe", "1f1b") for m in (1, 2, 3, 5)] + \
          [("interleaved", m, 2, "uniform") for m in (2, 4)] + [("gpipe", 3, 2, "parameters")] + \
          [("interleaved", 2, 3, [1, 2, 4, 5, 7])]
CASES_4 = [(s, m, 1, "uniform") for s in ("gpipe", "1f1b") for m in (1, 4, 6)] + \
          [("interleaved", m, 2, "uniform") for m in (4, 8)] + [("1f1b", 2, 1, [1, 2, 5])]


CASES_1 = [("gpipe", 2, 2, "uniform"), ("interleaved", 3, 2, "uniform"), ("1f1b", 2, 1, "uniform")]


@pytest.mark.parametrize("p,cases", [(1, CASES_1), (2, CASES_2), (4, CASES_4)])
def test_equals_dense(pool, p, cases):
    n_blocks = 8
    res = pool.run(_equal_dense, (p,), ("pipe",), cases, n_blocks, 60 if p == 2 else 24)
    total_params = [0] * len(cases)
    for out, ref_loss in res:
        for i, (loss, n_params) in enumerate(out):
            assert loss == pytest.approx(ref_loss, rel=1e-12), cases[i]   # loss on every pipe rank
            total_params[i] += n_params
    assert all(n == 2 * n_blocks for n in total_params)                    # every parameter checked once


def test_pipe_x_data(pool):
    cases = [("1f1b", 4, 1, "uniform"), ("interleaved", 4, 2, "uniform"), ("gpipe", 2, 1, "uniform")]
    res = pool.run(_equal_dense, (4, 2), ("pipe", "data"), cases, 8, 16)
    ref_loss = res[0][1]
    for i in range(len(cases)):
        per_replica = {r % 2: out[i][0] for r, (out, _) in enumerate(res)}
        assert sum(per_replica.values()) / 2 == pytest.approx(ref_loss, rel=1e-12)


def _errors(mesh):
    blocks = make_blocks(3)
    msgs = []
    for kw in [dict(schedule="1f1b", num_microbatches=2, chunks=2),
               dict(schedule="interleaved", num_microbatches=3, chunks=2),
               dict(schedule="gpipe", num_microbatches=0),
               dict(schedule="zigzag")]:
        with pytest.raises(ShardingError) as e:
            Pipeline(make_blocks(4), mesh, mse, **kw)
        msgs.append(str(e.value))
    with pytest.raises(ShardingError) as e:
        Pipeline(blocks, mesh, mse, schedule="gpipe", chunks=2)       # 4 stages > 3 blocks
    msgs.append(str(e.value))
    with pytest.raises(ShardingError) as e:
        Pipeline(blocks, mesh, mse, pipe_axis="stage")
    msgs.append(str(e.value))
    pipe = Pipeline(make_blocks(4), mesh, mse, num_microbatches=4)
    with pytest.raises(ShardingError) as e:
        pipe.step(*batch(6))                                           # 6 % 4 != 0, raised on every rank
    msgs.append(str(e.value))
    # a new batch size renegotiates the cached shapes on every rank that sees the batch
    for n in (8, 12, 8):
        x, t = batch(n)
        ref_loss, _ = reference(4, x, t)
        assert float(pipe.step(x, t)) == pytest.approx(float(ref_loss), rel=1e-12)
    return msgs


def test_errors_before_any_send(pool):
    msgs = pool.run(_errors, (2,), ("pipe",))[0]
    assert "chunks" in msgs[0] and "interleaved" in msgs[0]
    assert "multiple of the pipe size" in msgs[1]
    assert "num_microbatches" in msgs[2]
    assert "unknown pipeline schedule" in msgs[3]
    assert "3 blocks into 4" in msgs[4]
    assert "no pipeline axis 'stage'" in msgs[5]
    assert "not divisible by num_microbatches=4" in msgs[6]


def _train(mesh, schedule, chunks, steps):
    torch.manual_seed(5)
    pipe = Pipeline(make_blocks(8, seed=3), mesh, mse, schedule=schedule, num_microbatches=4, chunks=chunks)
    opt = torch.optim.SGD(pipe.parameters(), lr=0.1)
    x, t = batch(16, seed=7)
    t = torch.tanh(t)
    losses = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        losses.append(float(pipe.step(x, t)))
        opt.step()
    return losses


def test_interleaved_training_matches_1f1b(pool):
    inter = pool.run(_train, (4,), ("pipe",), "interleaved", 2, 6)
    ref = pool.run(_train, (4,), ("pipe",), "1f1b", 1, 6)
    for losses in inter:
        assert losses == pytest.approx(ref[0], rel=1e-10)    # same on every rank, same as 1F1B
        assert losses[-1] < 0.8 * losses[0]                   # and it trains


def _affine(params, x):
    return x @ params["w"] + params["b"]


def _functional(mesh):
    g = torch.Generator().manual_seed(4)
    ws = [(torch.randn(HIDDEN, HIDDEN, generator=g, dtype=torch.float64) / 3,
           torch.randn(HIDDEN, generator=g, dtype=torch.float64)) for _ in range(3)]
    blocks = []
    for w, b in ws:
        blocks += [(_affine, {"w": w.clone(), "b": b.clone()}), torch.tanh]
    pipe = Pipeline(blocks, mesh, mse, schedule="1f1b", num_microbatches=3)
    x, t = batch(9)
    loss = pipe.step(x, t)
    ref = [(w.clone().requires_grad_(), b.clone().requires_grad_()) for w, b in ws]
    h = x
    for w, b in ref:
        h = torch.tanh(h @ w + b)
    ref_loss = mse(h, t)
    ref_loss.backward()
    for name, prm in pipe.named_block_parameters():       # "<block>.params.<w|b>"
        i, _, which = name.split(".")
        w, b = ref[int(i) // 2]
        torch.testing.assert_close(prm.grad, (w if which == "w" else b).grad, rtol=1e-10, atol=1e-12)
    return float(loss), ref_loss.item(), [list(pipe.block_indices(c)) for c in range(pipe.chunks)]


def test_functional_blocks(pool):
    res = pool.run(_functional, (2,), ("pipe",))
    assert res[0][0] == pytest.approx(res[0][1], rel=1e-12)
    assert res[0][2] == [[0, 1, 2]] and res[1][2] == [[3, 4, 5]]


def _zero(mesh, stage):
    from meshpar.optim import zero

    x, t = batch(16)
    ref = nn.Sequential(*make_blocks(4))
    mse(ref(x), t).backward()
    with torch.no_grad():
        expect = {k: p - 0.1 * p.grad for k, p in ref.named_parameters()}
    d = mesh.coord("data")
    pipe = Pipeline(make_blocks(4), mesh, mse, schedule="1f1b", num_microbatches=4, data_axes=None)
    opt = zero(torch.optim.SGD(pipe.parameters(), lr=0.1), mesh, stage=stage, axis="data")
    pipe.no_sync = opt.no_sync
    opt.zero_grad()
    pipe.step(x.chunk(2)[d], t.chunk(2)[d])
    opt.step()
    for name, prm in pipe.named_block_parameters():
        torch.testing.assert_close(prm.detach(), expect[name], rtol=1e-10, atol=1e-12, msg=lambda s: f"{name}: {s}")
    return True


@pytest.mark.parametrize("stage", [1, 2])
def test_pipe_x_zero(pool, stage):
    """ZeRO reduces over data once per step (every backward but the rank's last runs in no_sync)."""
    assert all(pool.run(_zero, (2, 2), ("pipe", "data"), stage))
