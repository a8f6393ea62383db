"""The functional GPT in every parallel mode equals the dense model (float64)."""
from __future__ import annotations

import pytest
import torch

import meshpar.nn  # noqa: F401  (registers the layer rules)
from meshpar.errors import ShardingError
from meshpar.models.gpt import GPT, GPTConfig, generate, init_params, loss_fn
from meshpar.models.plans import make_plan, padded_sizes, shard_params, unpad
from meshpar.sharding import unshard

# mode -> (mesh shape, mesh names)
MESHES = {
    "1d": ((4,), ("tp",)),
    "1d+data": ((2, 4), ("data", "tp")),
    "2d": ((2, 2), ("x", "y")),
    "2d+data": ((2, 2, 2), ("data", "x", "y")),
    "2.5d": ((2, 2, 2), ("d", "x", "y")),
    "3d": ((2, 2, 2), ("i", "j", "k")),
}


def _params(cfg, seed):
    """init_params with every tensor perturbed, so biases and norm weights are exercised too."""
    p = init_params(cfg, seed, torch.float64)
    g = torch.Generator().manual_seed(seed + 1)
    return {n: t + 0.05 * torch.randn(t.shape, generator=g, dtype=torch.float64) for n, t in p.items()}


def _data(cfg, B, T, seed):
    g = torch.Generator().manual_seed(seed + 2)
    idx = torch.randint(0, cfg.vocab_size, (B, T), generator=g)
    tg = torch.randint(0, cfg.vocab_size, (B, T), generator=g)
    tg[0, 0] = -1  # an ignored position
    return idx, tg


def _dense_loss_grads(cfg, seed, B, T, train):
    params = {n: t.requires_grad_() for n, t in _params(cfg, seed).items()}
    idx, tg = _data(cfg, B, T, seed)
    loss = loss_fn(params, idx, tg, cfg, train=train, seed=seed)
    loss.backward()
    return loss.detach(), {n: t.grad for n, t in params.items()}


def _sharded_loss_grads(mesh, mode, cfg, seed, B, T, train):
    plan = make_plan(mode.split("+")[0], mesh)
    params = {n: t.requires_grad_() for n, t in shard_params(_params(cfg, seed), cfg, plan).items()}
    idx, tg = _data(cfg, B, T, seed)
    loss = loss_fn(params, idx, tg, cfg, plan, train=train, seed=seed)
    loss.backward()
    grads = {n: unpad(n, unshard(t.grad), cfg) for n, t in params.items()}
    return loss.detach(), grads if mesh.rank == 0 else None


def _rel(a, b):
    """Relative error; gradients that are exactly zero in exact arithmetic (e.g. key biases, which
    softmax ignores) are compared at the scale 1e-8 instead of their rounding noise."""
    return float((a - b).norm() / max(float(b.norm()), 1e-8))


CFG = dict(vocab_size=37, block_size=8, n_layer=2, n_head=4, n_embd=16)


@pytest.mark.parametrize("mode", list(MESHES))
@pytest.mark.parametrize("train", [False, True])
def test_gpt_grads_match_dense(pool, mode, train):
    cfg = GPTConfig(**CFG, dropout=0.2 if train else 0.0)
    B, T = 4, 6
    ref_loss, ref_g = _dense_loss_grads(cfg, 3, B, T, train)
    shape, names = MESHES[mode]
    out = pool.run(_sharded_loss_grads, shape, names, mode, cfg, 3, B, T, train)
    for loss, _ in out:
        assert abs(float(loss) - float(ref_loss)) <= 1e-9 * abs(float(ref_loss))
    grads = out[0][1]
    assert set(grads) == set(ref_g)
    for n, g in grads.items():
        assert g.shape == ref_g[n].shape, n
        assert _rel(g, ref_g[n]) < 1e-9, (n, _rel(g, ref_g[n]))


ODD = dict(vocab_size=29, block_size=8, n_layer=2, n_head=3, n_embd=12)  # heads/vocab/MLP padded


@pytest.mark.parametrize("mode,bias", [("1d", True), ("2d", False), ("3d", True)])
def test_gpt_padded_sizes_match_dense(pool, mode, bias):
    cfg = GPTConfig(**ODD, bias=bias)
    plan_sizes = padded_sizes(cfg, make_plan("dense"))
    assert plan_sizes.n_head == 3 and plan_sizes.vocab == 29
    ref_loss, ref_g = _dense_loss_grads(cfg, 5, 4, 5, False)
    shape, names = MESHES[mode]
    out = pool.run(_sharded_loss_grads, shape, names, mode, cfg, 5, 4, 5, False)
    assert abs(float(out[0][0]) - float(ref_loss)) <= 1e-9 * abs(float(ref_loss))
    for n, g in out[0][1].items():
        assert _rel(g, ref_g[n]) < 1e-9, (n, _rel(g, ref_g[n]))


def _train_steps(mesh, mode, cfg, seed, steps, B, T):
    plan = make_plan("dense") if mode == "dense" else make_plan(mode.split("+")[0], mesh)
    model = GPT(cfg, plan, _params(cfg, seed))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    losses = []
    for s in range(steps):
        idx, tg = _data(cfg, B, T, seed + 10 * s)
        loss = model(idx, tg, train=True, seed=s)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    final = {n: unpad(n, unshard(p.detach()), cfg) for n, p in model.named_parameters()}
    pad_zero = True
    for n, p in model.named_parameters():
        t = unshard(p.detach()).clone()
        unpad(n, t, cfg).zero_()  # a view of the real part
        pad_zero &= bool((t == 0).all())
    return losses, (final if mode == "dense" or mesh.rank == 0 else None), pad_zero


@pytest.mark.parametrize("mode", ["1d+data", "2d", "2.5d", "3d"])
def test_gpt_adamw_steps_match_dense(pool, mode):
    cfg = GPTConfig(**ODD, dropout=0.1)
    ref_losses, ref, _ = _train_steps(None, "dense", cfg, 7, 3, 4, 5)
    shape, names = MESHES[mode]
    out = pool.run(_train_steps, shape, names, mode, cfg, 7, 3, 4, 5)
    losses, final, pad_zero = out[0]
    assert pad_zero, "padded entries must stay exactly zero through AdamW"
    for a, b in zip(losses, ref_losses):
        assert abs(a - b) <= 1e-9 * abs(b)
    for n, t in final.items():
        assert _rel(t, ref[n]) < 1e-9, (n, _rel(t, ref[n]))


def _deferred(mesh, cfg, seed):
    model = GPT(cfg, make_plan("1d", mesh), _params(cfg, seed), defer_reduce=("data",))
    idx, tg = _data(cfg, 4, 5, seed)
    model(idx, tg).backward()
    specs = {n: p.grad.spec for n, p in model.named_parameters()}
    grads = {n: unpad(n, unshard(p.grad), cfg) for n, p in model.named_parameters()}  # unshard sums over data
    return specs, grads


def test_gpt_defer_data_reduce(pool):
    cfg = GPTConfig(**CFG)
    _, ref = _dense_loss_grads(cfg, 4, 4, 5, False)
    specs, grads = pool.run(_deferred, (2, 4), ("data", "tp"), cfg, 4)[0]
    assert all(s.unreduced == ("data",) for s in specs.values())
    for n, g in grads.items():
        assert _rel(g, ref[n]) < 1e-9, n


def _generate(mesh, mode, cfg, seed):
    plan = make_plan(mode, mesh)
    params = shard_params(_params(cfg, seed), cfg, plan)
    idx, _ = _data(cfg, 4, 3, seed)
    return generate(params, idx, cfg, plan, 4, temperature=0.8, top_k=5, seed=seed)


def test_generate_matches_dense(pool):
    cfg = GPTConfig(**CFG)
    idx, _ = _data(cfg, 4, 3, 1)
    ref = generate(_params(cfg, 1), idx, cfg, None, 4, temperature=0.8, top_k=5, seed=1)
    assert ref.shape == (4, 7) and torch.equal(ref[:, :3], idx)
    out = pool.run(_generate, (2, 2), ("x", "y"), "2d", cfg, 1)
    assert all(torch.equal(o, ref) for o in out)


def _bad_plans(mesh):
    msgs = []
    for fn in (lambda: make_plan("2d", mesh), lambda: make_plan("3d", mesh), lambda: make_plan("dense", mesh),
               lambda: make_plan("4d", mesh)):
        try:
            fn()
            msgs.append(None)
        except ShardingError as e:
            msgs.append(str(e))
    return msgs


def _bad_3d_weight(mesh):
    from meshpar import strict as meshpar_strict
    from meshpar.nn.functional import linear
    from meshpar.sharding import P, shard
    x = shard(torch.zeros(4, 2, 8, dtype=torch.float64), P(("i", "j"), None, "k"), mesh)
    w = shard(torch.zeros(8, 8, dtype=torch.float64), P(("j", "i"), "k"), mesh)  # in-dim split over (j,i), not k
    try:
        with meshpar_strict():  # by default the layouts would be resharded implicitly
            linear(x, w)
    except ShardingError as e:
        return str(e)
    return None


def test_bad_inputs(pool):
    cfg = GPTConfig(**CFG)
    with pytest.raises(ShardingError, match="exceeds block_size"):
        loss_fn(init_params(cfg), torch.zeros(1, 9, dtype=torch.long), torch.zeros(1, 9, dtype=torch.long), cfg)
    with pytest.raises(ShardingError, match="needs a mesh"):
        make_plan("2d")
    with pytest.raises(ValueError, match="multiple of n_head"):
        GPTConfig(vocab_size=5, block_size=4, n_layer=1, n_head=3, n_embd=8)
    m = pool.run(_bad_plans, (2, 4), ("x", "y"))[0]
    assert "square" in m[0] and "needs mesh axes" in m[1] and "no mesh" in m[2] and "unknown parallel mode" in m[3]
    msg = pool.run(_bad_3d_weight, (2, 2, 2), ("i", "j", "k"))[0]
    assert msg is not None and "P(('j', 'i'), 'k')" in msg
