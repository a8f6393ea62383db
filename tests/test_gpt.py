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
