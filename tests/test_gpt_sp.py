"""The functional GPT with sequence parallelism ("sp", "1d+sp", with/without "data") equals dense (float64).

Loss and every parameter gradient of a 2-layer GPT, ring and all-to-all attention, contiguous and
balanced (zigzag) layouts, relative error < 1e-9.
"""
from __future__ import annotations

import pytest
import torch

import meshpar.nn  # noqa: F401  (registers the layer rules)
from meshpar.errors import ShardingError
from meshpar.models.gpt import GPT, GPTConfig, generate, init_params, loss_fn
from meshpar.models.plans import make_plan, shard_params, unpad
from meshpar.sharding import unshard

CFG = dict(vocab_size=37, block_size=16, n_layer=2, n_head=4, n_embd=16)

# case -> (mode, mesh shape, mesh names, sequence_mode, balanced)
CASES = {
    "sp2-ring": ("sp", (2,), ("sp",), "ring", False),
    "sp2-a2a": ("sp", (2,), ("sp",), "all_to_all", False),
    "sp4-ring": ("sp", (4,), ("sp",), "ring", False),
    "sp4-ring-balanced": ("sp", (4,), ("sp",), "ring", True),
    "sp4-a2a": ("sp", (4,), ("sp",), "all_to_all", False),
    "sp2xtp2-ring": ("1d+sp", (2, 2), ("sp", "tp"), "ring", False),
    "sp2xtp2-a2a": ("1d+sp", (2, 2), ("sp", "tp"), "all_to_all", False),
    "data2xsp2-ring": ("sp", (2, 2), ("data", "sp"), "ring", True),
    "data2xsp2xtp2-a2a": ("1d+sp", (2, 2, 2), ("data", "sp", "tp"), "all_to_all", False),
    "sp2xtp2-a2a-balanced": ("1d+sp", (2, 2), ("sp", "tp"), "all_to_all", True),
}


def _params(cfg: GPTConfig, seed: int) -> dict[str, torch.Tensor]:
    """init_params with every tensor perturbed, so biases and norm weights are exercised too."""
    p = init_params(cfg, seed, torch.float64)
    g = torch.Generator().manual_seed(seed + 1)
    return {n: t + 0.05 * torch.randn(t.shape, generator=g, dtype=torch.float64) for n, t in p.items()}


def _data(cfg: GPTConfig, B: int, T: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed + 2)
    idx = torch.randint(0, cfg.vocab_size, (B, T), generator=g)
    tg = torch.randint(0, cfg.vocab_size, (B, T), generator=g)
    tg[0, 0] = -1  # an ignored position
    return idx, tg


def _local(mesh, *ts):
    """This data rank's block of each global batch tensor (the batch contract: a model takes local batches)."""
    if mesh is None or "data" not in mesh.names:
        return ts
    nd, d = mesh.size("data"), mesh.coord("data")
    return tuple(t.chunk(nd)[d] for t in ts)


def _dense_loss_grads(cfg: GPTConfig, seed: int, B: int, T: int):
    params = {n: t.requires_grad_() for n, t in _params(cfg, seed).items()}
    idx, tg = _data(cfg, B, T, seed)
    loss = loss_fn(params, idx, tg, cfg)
    loss.backward()
    return loss.detach(), {n: t.grad for n, t in params.items()}


def _sharded_loss_grads(mesh, mode, seq_mode, balanced, cfg, seed, B, T):
    plan = make_plan(mode, mesh, sequence_mode=seq_mode, balanced=balanced)
    params = {n: t.requires_grad_() for n, t in shard_params(_params(cfg, seed), cfg, plan).items()}
    idx, tg = _local(mesh, *_data(cfg, B, T, seed))
    loss = loss_fn(params, idx, tg, cfg, plan)
    loss.backward()
    grads = {n: unpad(n, unshard(t.grad), cfg) for n, t in params.items()}
    return loss.detach(), grads if mesh.rank == 0 else None


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error; exactly-zero reference gradients (key biases) are compared at scale 1e-8."""
    return float((a - b).norm() / max(float(b.norm()), 1e-8))


@pytest.mark.parametrize("case", list(CASES))
def test_gpt_sp_grads_match_dense(pool, case):
    mode, shape, names, seq_mode, balanced = CASES[case]
    cfg = GPTConfig(**CFG)
    B, T = 4, 16
    ref_loss, ref_g = _dense_loss_grads(cfg, 3, B, T)
    out = pool.run(_sharded_loss_grads, shape, names, mode, seq_mode, balanced, cfg, 3, B, T)
    for loss, _ in out:
        assert abs(float(loss) - float(ref_loss)) <= 1e-9 * abs(float(ref_loss))
    grads = out[0][1]
    assert set(grads) == set(ref_g)
    for n, g in grads.items():
        assert g.shape == ref_g[n].shape, n
        assert _rel(g, ref_g[n]) < 1e-9, (n, _rel(g, ref_g[n]))


ODD = dict(vocab_size=29, block_size=8, n_layer=2, n_head=3, n_embd=12)  # heads padded for tp / all-to-all


def _train_steps(mesh, mode, seq_mode, cfg, seed, steps, B, T):
    plan = make_plan("dense") if mode == "dense" else make_plan(mode, mesh, sequence_mode=seq_mode)
    model = GPT(cfg, plan, _params(cfg, seed))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    losses = []
    for s in range(steps):
        idx, tg = _local(mesh, *_data(cfg, B, T, seed + 10 * s))
        loss = model(idx, tg)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    final = {n: unpad(n, unshard(p.detach()), cfg) for n, p in model.named_parameters()}
    return losses, (final if mode == "dense" or mesh.rank == 0 else None)


def test_gpt_sp_adamw_padded_heads_match_dense(pool):
    """1d+sp with all-to-all pads 3 heads to 4 (tp*sp); three AdamW steps equal dense."""
    cfg = GPTConfig(**ODD)
    ref_losses, ref = _train_steps(None, "dense", "ring", cfg, 7, 3, 2, 8)
    losses, final = pool.run(_train_steps, (2, 2), ("sp", "tp"), "1d+sp", "all_to_all", cfg, 7, 3, 2, 8)[0]
    for a, b in zip(losses, ref_losses):
        assert abs(a - b) <= 1e-9 * abs(b)
    for n, t in final.items():
        assert _rel(t, ref[n]) < 1e-9, (n, _rel(t, ref[n]))


def _plan_specs(mesh):
    plan = make_plan("1d+sp", mesh, balanced=True)
    return plan.act, plan.seq_axes


def test_balanced_plan_is_a_spec_tag(pool):
    """balanced=True is the layout of the activations' sequence dim, nothing else."""
    from meshpar import P, Zigzag
    act, seq_axes = pool.run(_plan_specs, (2, 2), ("sp", "tp"))[0]
    z = Zigzag("sp")
    assert seq_axes == (z,)
    assert act == dict(tokens=P(None, z), resid=P(None, z, None), inner=P(None, z, "tp"), logits=P(None, z, "tp"),
                       targets=P(None, z))


def _generate(mesh, balanced, cfg, seed):
    plan = make_plan("sp", mesh, balanced=balanced)
    params = shard_params(_params(cfg, seed), cfg, plan)
    idx, _ = _data(cfg, 2, 3, seed)
    return generate(params, idx, cfg, plan, 7, temperature=0.8, top_k=5, seed=seed)


@pytest.mark.parametrize("balanced", [False, True])
def test_generate_sp_matches_dense(pool, balanced):
    """Contexts of any length (3..9 tokens) are right-padded to the split; the samples equal dense."""
    cfg = GPTConfig(**CFG)
    idx, _ = _data(cfg, 2, 3, 1)
    ref = generate(_params(cfg, 1), idx, cfg, None, 7, temperature=0.8, top_k=5, seed=1)
    out = pool.run(_generate, (2,), ("sp",), balanced, cfg, 1)
    assert all(torch.equal(o, ref) for o in out)


def _bad(mesh):
    cfg = GPTConfig(**CFG)
    msgs = []
    calls = (lambda: make_plan("sp", mesh, sequence_mode="ulysses"),
             lambda: make_plan("1d+sp", mesh),
             lambda: make_plan("1d", mesh, balanced=True),
             lambda: loss_fn(shard_params(init_params(cfg), cfg, make_plan("sp", mesh)), torch.zeros(1, 6, dtype=torch.long),
                             torch.zeros(1, 6, dtype=torch.long), cfg, make_plan("sp", mesh)),
             lambda: loss_fn(shard_params(init_params(GPTConfig(**CFG, dropout=0.1)), cfg, make_plan("sp", mesh)),
                             torch.zeros(1, 8, dtype=torch.long), torch.zeros(1, 8, dtype=torch.long),
                             GPTConfig(**CFG, dropout=0.1), make_plan("sp", mesh), train=True))
    for fn in calls:
        try:
            fn()
            msgs.append(None)
        except ShardingError as e:
            msgs.append(str(e))
    return msgs


def test_sp_bad_inputs(pool):
    m = pool.run(_bad, (4,), ("sp",))[0]
    assert "unknown sequence_mode" in m[0]
    assert "needs mesh axes ('tp', 'sp')" in m[1]
    assert "balanced=True" in m[2]
    assert "not divisible by sp = 4" in m[3]
    assert "dropout" in m[4]
