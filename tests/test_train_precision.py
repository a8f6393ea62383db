"""Engine precision and ZeRO-3 (issue 17 item 4): ``precision=`` is the one place that says the compute
dtype (an fp32 model runs under bf16, plain or sharded, with fp32 masters from its fp32 values);
``gather_model()`` is the full model in every ZeRO stage; the Trainer keeps float64 losses."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

B = 8


def _data(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 6, generator=g, dtype=dtype)
    y = (x @ torch.randn(6, 1, generator=g, dtype=dtype)).squeeze(1)
    return torch.utils.data.TensorDataset(x, y)


def _mlp(dtype):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16, dtype=dtype), nn.Tanh(), nn.Linear(16, 1, dtype=dtype))


def _mse(out, y):
    return ((out.squeeze(-1) - y) ** 2).mean()


def _global_batches(ds, data, seed, steps):
    from meshpar.train import ShardedSampler

    b = B // data
    orders = [list(ShardedSampler(ds, data, r, shuffle=True, seed=seed, batch_size=b)) for r in range(data)]
    for s in range(steps):
        idx = [i for r in range(data) for i in orders[r][s * b:(s + 1) * b]]
        yield ds.tensors[0][idx], ds.tensors[1][idx]


def _zero_run(mesh, stage: int):
    from meshpar.train import Trainer, context_for, get_dataloader, initialize

    ctx = context_for(dict(zero=dict(stage=stage)), mesh=mesh)
    ds = _data(torch.float64)
    dl = get_dataloader(ds, batch_size=B // mesh.size("data"), mesh=mesh, seed=1)
    engine, dl, _, _ = initialize(_mlp(torch.float64), lambda p: torch.optim.SGD(p, lr=0.1), _mse, dl, ctx=ctx)
    losses = Trainer(engine, progress=False).fit(dl, max_steps=3)
    got = {n: p.detach().clone() for n, p in engine.gather_model().named_parameters()}
    ref = _mlp(torch.float64)
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    want_losses = []
    for x, y in _global_batches(ds, mesh.size("data"), 1, 3):
        opt.zero_grad()
        loss = _mse(ref(x), y)
        loss.backward()
        opt.step()
        want_losses.append(loss.item())
    err = max(float((got[n] - p.detach()).abs().max()) for n, p in ref.named_parameters())
    shapes = {n: tuple(t.shape) for n, t in got.items()}
    return losses, want_losses, err, shapes, {n: tuple(p.shape) for n, p in ref.named_parameters()}


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_gather_model_is_the_full_model_in_every_zero_stage(pool, stage):
    for losses, want, err, shapes, want_shapes in pool.run(_zero_run, (2,), ("data",), stage):
        assert shapes == want_shapes
        assert err < 1e-12, err
        assert max(abs(a - b) for a, b in zip(losses, want)) < 1e-12  # float64 losses stay float64


def _bf16_plain(mesh):
    from meshpar.train import Trainer, context_for, get_dataloader, initialize

    ctx = context_for(dict(precision="bf16"), mesh=mesh)
    dl = get_dataloader(_data(), batch_size=B // mesh.size("data"), mesh=mesh, seed=1)
    model = _mlp(torch.float32)
    engine, dl, _, _ = initialize(model, lambda p: torch.optim.SGD(p, lr=0.1), _mse, dl, ctx=ctx)
    losses = Trainer(engine, progress=False).fit(dl, max_steps=3)
    return losses, str(next(model.parameters()).dtype)


def test_plain_fp32_model_runs_under_bf16(pool):
    for losses, dtype in pool.run(_bf16_plain, (2,), ("data",)):
        assert len(losses) == 3 and all(v == v and abs(v) < 1e3 for v in losses)
        assert dtype == "torch.bfloat16"


def _bf16_sharded(mesh):
    import meshpar as mp
    from meshpar.nn import Linear2D
    from meshpar.train import context_for, initialize

    ctx = context_for(dict(parallel=dict(tensor=dict(size=4, mode="2d")), precision="bf16"), mesh=mesh)
    with mesh:
        model = nn.Sequential(Linear2D(8, 16, seed=1), nn.Tanh(), Linear2D(16, 4, seed=2))
    init = {n: mp.unshard(p).detach().clone() for n, p in model.named_parameters()}
    dense = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4)).double()
    with torch.no_grad():
        for (n, p), d in zip(model.named_parameters(), dense.parameters()):
            d.copy_(init[n].T if init[n].ndim == 2 else init[n])
    engine, *_ = initialize(model, lambda p: torch.optim.SGD(p, lr=0.1), nn.CrossEntropyLoss(), ctx=ctx)
    # the masters hold the fp32 values (not bf16-rounded ones)
    opt = engine.optimizer
    master_ok = all(b.master.dtype == torch.float32 for b in opt.buckets)
    dtypes = {str(p.dtype) for p in engine.model.parameters()}
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(4, 8, generator=g), torch.randint(0, 4, (4,), generator=g)
    engine.zero_grad()
    out = engine(x)
    loss = engine.criterion(out, y)
    engine.backward(loss)
    engine.step()
    ref = nn.functional.cross_entropy(dense(x.double()), y).item()
    masters = torch.cat([b.master.reshape(-1) for b in opt.buckets])
    return master_ok, dtypes, str(out.dtype), float(mp.unshard(loss)), ref, bool(torch.isfinite(masters).all()), \
        {n: float((t - t.to(torch.bfloat16).float()).abs().max()) for n, t in init.items()}


def test_sharded_fp32_model_runs_under_bf16(pool):
    for master_ok, dtypes, out_dtype, loss, ref, finite, _ in pool.run(_bf16_sharded, (1, 2, 2),
                                                                        ("data", "x", "y")):
        assert master_ok and finite
        assert dtypes == {"torch.bfloat16"} and out_dtype == "torch.bfloat16"
        assert abs(loss - ref) < 3e-2, (loss, ref)


def _masters_exact(mesh):
    """The fp32 masters of a converted sharded model equal its fp32 initial values exactly."""
    import meshpar as mp
    from meshpar.nn import Linear2D
    from meshpar.optim.params import local_of
    from meshpar.train import context_for, initialize

    ctx = context_for(dict(parallel=dict(tensor=dict(size=4, mode="2d")), precision="bf16"), mesh=mesh)
    with mesh:
        model = nn.Sequential(Linear2D(8, 16, seed=1))
    blocks = {n: local_of(p).detach().clone().reshape(-1) for n, p in model.named_parameters()}
    engine, *_ = initialize(model, lambda p: torch.optim.SGD(p, lr=0.1), None, ctx=ctx)
    opt = engine.optimizer
    names = {id(p): n for n, p in engine.model.named_parameters()}
    err = 0.0
    for b in opt.buckets:
        for e in b.entries:
            m = b.master[e.offset:e.offset + e.numel]
            err = max(err, float((m - blocks[names[id(e.param)]]).abs().max()))
    rounded = max(float((t - t.to(torch.bfloat16).float()).abs().max()) for t in blocks.values())
    return err, rounded, mp.unshard(next(engine.model.parameters())).dtype


def test_fp32_masters_come_from_the_fp32_model(pool):
    for err, rounded, dtype in pool.run(_masters_exact, (1, 2, 2), ("data", "x", "y")):
        assert err == 0.0 and rounded > 0.0 and dtype == torch.bfloat16
