"""The batch contract (issue 17): every plan x data degree trains on the *global* batch.

Through the documented path — ``context`` from a config, ``get_dataloader(ds, batch_size=B // data)``,
``initialize``, ``Trainer.fit`` — the losses and parameters after 3 steps equal dense training on
the global batch (the union of every data rank's batch) in float64. Every model is built by
:func:`build_model` and read back by :func:`full_params` (the two places to switch when the GPT
becomes a plain module planned by ``parallelize``).
"""
from __future__ import annotations

import pytest
import torch

B = 8          # global batch
STEPS = 3
LR = 0.5


def build_model(ctx, gcfg):
    """The model under test for the context's layout (the one place that applies the plan)."""
    from meshpar.models.gpt import GPT
    from meshpar.train import parallelize_model

    return parallelize_model(GPT(gcfg, seed=5, dtype=torch.float64), ctx)


def build_dense(gcfg):
    """The dense reference model (same initial values as :func:`build_model`)."""
    from meshpar.models.gpt import GPT

    return GPT(gcfg, seed=5, dtype=torch.float64)


def full_params(model, gcfg) -> dict[str, torch.Tensor]:
    """Name -> the full dense value of every parameter of ``model`` (collective)."""
    from meshpar import ShardedTensor, unshard

    return {n: (unshard(p) if isinstance(p, ShardedTensor) else p).detach().clone()
            for n, p in model.named_parameters()}


def _gcfg():
    from meshpar.models.gpt import GPTConfig

    return GPTConfig(vocab_size=32, block_size=8, n_layer=1, n_head=4, n_embd=16)


def _dataset():
    g = torch.Generator().manual_seed(0)
    toks = torch.randint(0, 32, (48, 9), generator=g)
    return torch.utils.data.TensorDataset(toks[:, :-1], toks[:, 1:])


def _global_batches(ds, data: int, seed: int):
    """The global batch of each step: every data rank's batch, in data-rank order."""
    from meshpar.train import ShardedSampler

    b = B // data
    orders = [list(ShardedSampler(ds, data, r, shuffle=True, seed=seed, batch_size=b)) for r in range(data)]
    for s in range(STEPS):
        idx = [i for r in range(data) for i in orders[r][s * b:(s + 1) * b]]
        yield ds.tensors[0][idx], ds.tensors[1][idx]


def _criterion():
    import meshpar.nn as mnn

    return mnn.CrossEntropyLoss()


def _dense_run(ds, data: int, seed: int, gcfg):
    model = build_dense(gcfg)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    crit = _criterion()
    losses = []
    for x, y in _global_batches(ds, data, seed):
        opt.zero_grad()
        loss = crit(model(x), y)
        loss.backward()
        opt.step()
        losses.append(float(loss))
    return losses, {n: p.detach().clone() for n, p in model.named_parameters()}


def _engine_run(mesh, parallel: dict, extra: dict):
    from meshpar.train import Trainer, context_for, get_dataloader, initialize

    gcfg = _gcfg()
    ds = _dataset()
    ctx = context_for(dict(parallel=parallel, seed=11, **extra), mesh=mesh)
    data = ctx.mesh.size("data")
    dl = get_dataloader(ds, batch_size=B // data, mesh=ctx.mesh, seed=3)
    model = build_model(ctx, gcfg)
    engine, dl, _, _ = initialize(model, lambda p: torch.optim.SGD(p, lr=LR, momentum=0.9), _criterion(), dl,
                                  ctx=ctx, debug=True)
    losses = Trainer(engine, progress=False).fit(dl, max_steps=STEPS)
    got = full_params(engine.gather_model(), gcfg)
    want_losses, want = _dense_run(ds, data, 3, gcfg)
    err = max(float((got[n] - want[n]).abs().max()) for n in want)
    return losses, want_losses, err


# (id, parallel config, extra config keys, world size)
CASES = [
    ("dp-data2", dict(data=2), {}, 2),
    ("dp-data4", dict(data=4), {}, 4),
    ("1d-data1", dict(data=1, tensor=dict(size=4, mode="1d")), {}, 4),
    ("1d-data2", dict(data=2, tensor=dict(size=2, mode="1d")), {}, 4),
    ("1d-data2-tp4", dict(data=2, tensor=dict(size=4, mode="1d")), {}, 8),
    ("2d-data1", dict(data=1, tensor=dict(size=4, mode="2d")), {}, 4),
    ("2d-data2", dict(data=2, tensor=dict(size=4, mode="2d")), {}, 8),
    ("2.5d-data1", dict(data=1, tensor=dict(size=8, mode="2.5d", depth=2)), {}, 8),
    ("3d-data1", dict(data=1, tensor=dict(size=8, mode="3d")), {}, 8),
    # 16 ranks: runs with MESHPAR_TEST_WORLD=16 only (data x 3d on 8 ranks: tests/test_gpt.py "3d+data")
    ("3d-data2", dict(data=2, tensor=dict(size=8, mode="3d")), {}, 16),
    ("sp-data1", dict(data=1, sequence=dict(size=4)), {}, 4),
    ("sp-data2", dict(data=2, sequence=dict(size=2)), {}, 4),
    ("1d+sp-data2", dict(data=2, tensor=dict(size=2, mode="1d"), sequence=dict(size=2)), {}, 8),
    ("pipe-data2", dict(data=2, pipeline=2), dict(pipeline_schedule=dict(num_microbatches=2)), 4),
    ("pipe-1d-data1", dict(data=1, pipeline=2, tensor=dict(size=2, mode="1d")),
     dict(pipeline_schedule=dict(num_microbatches=2)), 4),
    ("pipe-1d-data2", dict(data=2, pipeline=2, tensor=dict(size=2, mode="1d")),
     dict(pipeline_schedule=dict(num_microbatches=2)), 8),
    ("zero1-2d-data2", dict(data=2, tensor=dict(size=4, mode="2d")), dict(zero=dict(stage=1)), 8),
    ("zero2-1d-data2", dict(data=2, tensor=dict(size=2, mode="1d")), dict(zero=dict(stage=2)), 4),
    ("zero3-1d-data2", dict(data=2, tensor=dict(size=2, mode="1d")), dict(zero=dict(stage=3)), 4),
]


def _mesh_of(parallel: dict, extra: dict, world: int):
    from meshpar.train import load_config

    par = load_config(dict(parallel=parallel, **extra), world_size=world).parallel
    return par.mesh_shape, par.mesh_names


@pytest.mark.parametrize("case", [c if hasattr(c, "marks") else pytest.param(c, id=c[0]) for c in CASES])
def test_engine_trains_on_the_global_batch(pool, case):
    name, parallel, extra, world = case
    if world > pool.world_size:
        pytest.skip(f"needs {world} ranks (MESHPAR_TEST_WORLD={pool.world_size})")
    shape, names = _mesh_of(parallel, extra, world)
    res = pool.run(_engine_run, shape, names, parallel, extra)
    for losses, want_losses, err in res:
        assert len(losses) == STEPS
        assert max(abs(a - b) for a, b in zip(losses, want_losses)) < 1e-10, (losses, want_losses)
        assert err < 1e-10, err


# ---------------------------------------------------------------- the hand-built model side

def _hand_built(mesh):
    """A per-rank batch placed four ways: only ``from_local(x, P("data"))`` is the global batch."""
    import meshpar as mp
    from meshpar import P

    g = torch.Generator().manual_seed(0)
    X = torch.randn(8, 4, generator=g, dtype=torch.float64)
    W = torch.randn(4, 6, generator=g, dtype=torch.float64)
    n, r = mesh.size("data"), mesh.coord("data")
    x = X[r * 8 // n:(r + 1) * 8 // n]          # this data rank's batch
    w = mp.shard(W, P(None, "tp"), mesh)
    dense = float((X @ W).square().mean())

    def loss(xx):
        return float(mp.unshard((xx @ w).square().mean()))

    right = loss(mp.from_local(x, P("data"), mesh))
    wrong = [loss(mp.shard(x, P(), mesh)), loss(mp.shard(x, P("data", None), mesh))]
    return dense, right, wrong


def test_hand_built_contract(pool):
    for dense, right, wrong in pool.run(_hand_built, (2, 2), ("data", "tp")):
        assert abs(right - dense) < 1e-12
        assert all(abs(w - dense) > 1e-6 for w in wrong)  # what the docs warn about


def _debug_catches(mesh):
    """In debug mode the engine refuses a batch that differs inside a data group, and a ShardedTensor
    batch that claims to be replicated over "data" but is not."""
    import torch.nn as nn

    import meshpar as mp
    from meshpar import P, ShardingError
    from meshpar.train import context_for, initialize

    ctx = context_for(dict(parallel=dict(data=2, tensor=dict(size=2, mode="1d"))), mesh=mesh)

    def make(seed):
        torch.manual_seed(seed)
        model = nn.Module()
        model.w = nn.Parameter(mp.shard(torch.randn(4, 4, dtype=torch.float64), P(None, "tp"), mesh))
        model.forward = lambda x: x @ model.w  # noqa: E731
        return model

    try:
        initialize(make(mesh.rank), lambda p: torch.optim.SGD(p, lr=0.1), None, ctx=ctx, debug=True)
        bad_init = "accepted"
    except ShardingError as e:
        bad_init = str(e)
    engine, *_ = initialize(make(0), lambda p: torch.optim.SGD(p, lr=0.1), None, ctx=ctx, debug=True)
    out = [bad_init]
    per_rank = torch.full((2, 4), float(mesh.rank), dtype=torch.float64)  # differs between tp peers
    try:
        engine(per_rank)
        out.append("accepted")
    except ShardingError as e:
        out.append(str(e))
    claimed = mp.shard(torch.full((2, 4), float(mesh.coord("data")), dtype=torch.float64), P(), mesh)
    try:
        engine(claimed)
        out.append("accepted")
    except ShardingError as e:
        out.append(str(e))
    fine = torch.full((2, 4), float(mesh.coord("data")), dtype=torch.float64)
    y = engine(fine)
    out.append((tuple(y.shape), str(y.spec)))
    return out


def test_debug_mode_detects_mismatched_batches(pool):
    for bad_init, per_rank, claimed, fine in pool.run(_debug_catches, (2, 2), ("data", "tp")):
        assert "parameter 'w'" in bad_init and "differs across the ranks of mesh axes ('data',)" in bad_init
        assert "differs across the ranks of mesh axes ('tp',)" in per_rank and "get_dataloader" in per_rank
        assert "differs across the ranks of mesh axes ('data', 'tp')" in claimed or \
            "differs across the ranks of mesh axes ('data',)" in claimed
        assert fine[0] == (4, 4)  # 2 rows per data rank -> a global batch of 4
