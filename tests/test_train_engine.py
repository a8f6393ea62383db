"""Engine/Trainer on the gloo pool: exact resume, two layouts in one program, pipelines through initialize."""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from meshpar.train import CheckpointHook, Trainer, context_for, get_dataloader, initialize

CFG = dict(gradient_accumulation=2, clip_grad_norm=0.5, seed=7, train=dict(batch_size=8))


def _data() -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 6, generator=g)
    y = (x @ torch.randn(6, 1, generator=g)).squeeze(1) + 0.1 * torch.randn(96, generator=g)
    return torch.utils.data.TensorDataset(x, y)


def _build(ctx, ckpt: str | None, resume: bool):
    torch.manual_seed(ctx.seed_for(()))
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Dropout(0.2), nn.Linear(16, 1))
    crit = lambda out, y: ((out.squeeze(1) - y) ** 2).mean()  # noqa: E731
    dl = get_dataloader(_data(), batch_size=8 // ctx.mesh.size("data"), mesh=ctx.mesh, seed=3)
    engine, dl, _, _ = initialize(model, lambda p: torch.optim.AdamW(p, lr=3e-2), crit, dl,
                                  lr_scheduler=lambda o: torch.optim.lr_scheduler.StepLR(o, 2, 0.5), ctx=ctx)
    hooks = [CheckpointHook(ckpt, every=3, resume=resume)] if ckpt else []
    torch.manual_seed(ctx.seed_for(ctx.mesh.names))  # per-rank dropout stream
    return Trainer(engine, hooks, progress=False), dl


def _resume(mesh, root: str):
    ctx = context_for(CFG, mesh=mesh)
    tr, dl = _build(ctx, None, False)
    full = tr.fit(dl, max_steps=8)  # 8 steps x 2 micro-batches: crosses an epoch (6 per epoch)
    tr, dl = _build(ctx, root, False)
    first = tr.fit(dl, max_steps=3)
    tr, dl = _build(ctx, root, True)
    rest = tr.fit(dl, max_steps=8)
    return full, first, rest, tr.engine.optimizer.param_groups[0]["lr"]


def test_exact_resume_data_parallel(pool, tmp_path):
    res = pool.run(_resume, (2,), ("data",), str(tmp_path / "ck"))
    full, first, rest, lr = res[0]
    assert len(full) == 8 and full[-1] < full[0]
    assert first == full[:3]
    assert rest == full[3:]  # bit-identical after resume (data order, RNG, optimizer state)
    assert lr == 3e-2 * 0.5 ** 4
    assert res[1][0] == full  # every rank logs the same data-averaged loss


def _two_layouts(rank: int, world: int):
    from meshpar import ShardedTensor, unshard
    from meshpar.models.gpt import GPT, GPTConfig
    from meshpar.train import parallelize_model

    gcfg = GPTConfig(vocab_size=32, block_size=8, n_layer=1, n_head=2, n_embd=16)
    g = torch.Generator().manual_seed(0)
    t = torch.randint(0, 32, (8, 9), generator=g)
    a = context_for(dict(parallel=dict(tensor=dict(size=4, mode="2d"))))
    b = context_for(dict(parallel=dict(tensor=dict(size=4, mode="1d"))))
    ma = parallelize_model(GPT(gcfg, seed=5, dtype=torch.float64), a)
    mb = parallelize_model(GPT(gcfg, seed=5, dtype=torch.float64), b)
    full = lambda l: float(unshard(l) if isinstance(l, ShardedTensor) else l)  # noqa: E731
    la, lb = full(ma(t[:, :-1], t[:, 1:])), full(mb(t[:, :-1], t[:, 1:]))
    dense = float(GPT(gcfg, seed=5, dtype=torch.float64)(t[:, :-1], t[:, 1:]))
    seeds = (a.seed_for(()), a.seed_for("x"), a.mesh.coord("x"), a.seed_for(a.mesh.names))
    with a.rng("x"):
        draw = torch.rand(2).tolist()
    return a.mesh.names, b.mesh.names, la, lb, dense, seeds, draw


def test_two_layouts_in_one_program(pool):
    res = pool.run(_two_layouts, None)
    for names_a, names_b, la, lb, dense, _, _ in res:
        assert names_a == ("data", "x", "y") and names_b == ("data", "tp")
        assert abs(la - dense) < 1e-10 and abs(lb - dense) < 1e-10
    # seeds: global equal everywhere; per-axis equal exactly on ranks sharing that coordinate; per-rank distinct
    assert len({r[5][0] for r in res}) == 1
    by_x = {}
    for r in res:
        by_x.setdefault(r[5][2], set()).add((r[5][1], tuple(r[6])))
    assert all(len(v) == 1 for v in by_x.values()) and len({next(iter(v)) for v in by_x.values()}) == len(by_x)
    assert len({r[5][3] for r in res}) == len(res)


def _pipeline_run(mesh):
    torch.manual_seed(11)
    blocks = [nn.Linear(6, 16, dtype=torch.float64), nn.Tanh(), nn.Linear(16, 16, dtype=torch.float64), nn.Tanh(),
              nn.Linear(16, 1, dtype=torch.float64)]
    ref = copy.deepcopy(nn.Sequential(*blocks))  # the same model, unpipelined, as the reference
    crit = lambda out, y: ((out.squeeze(1) - y) ** 2).mean()  # noqa: E731
    ds = _data()
    x, y = ds.tensors[0][:8].double(), ds.tensors[1][:8].double()
    ctx = context_for(dict(parallel=dict(pipeline=2, data=1), pipeline_schedule=dict(num_microbatches=4)), mesh=mesh)
    engine, *_ = initialize(nn.Sequential(*blocks), lambda p: torch.optim.SGD(p, lr=0.1), crit, ctx=ctx)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    got, want = [], []
    for _ in range(3):
        engine.zero_grad()
        got.append(float(engine.train_batch((x, y))))
        engine.step()
        ref_opt.zero_grad()
        loss = crit(ref(x), y)
        loss.backward()
        ref_opt.step()
        want.append(float(loss))
    return got, want


def test_pipeline_through_initialize(pool):
    for got, want in pool.run(_pipeline_run, (2, 1), ("pipe", "data")):
        assert len(got) == 3 and max(abs(a - b) for a, b in zip(got, want)) < 1e-12, (got, want)
