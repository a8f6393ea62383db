"""meshpar's plain GPT parallelized from outside (``parallelize`` + the ``"gpt"`` plan tables) equals
the dense model (float64): loss, every parameter gradient, and the parameters after AdamW steps."""
from __future__ import annotations

import copy
import math

import pytest
import torch

import meshpar as mp
from meshpar.errors import ShardingError
from meshpar.models.gpt import GPT, GPTConfig
from meshpar.models.plans import parallel_plan
from meshpar.parallel import parallelize

# mode -> (mesh shape, mesh names)
MESHES = {
    "1d": ((4,), ("tp",)),
    "1d+data": ((2, 2), ("data", "tp")),
    "2d": ((2, 2), ("x", "y")),
    "2d+data": ((2, 2, 2), ("data", "x", "y")),
    "2.5d": ((2, 2, 2), ("d", "x", "y")),
    "3d": ((2, 2, 2), ("i", "j", "k")),
    # data x 3d on 8 ranks: i = 1 (the j <-> k alternation of the batch and hidden splits is all there; the
    # gather of w over i is trivial); the 2x2x2 cube with data=2 is tests/test_batch_contract.py's 16-rank case
    "3d+data": ((2, 1, 2, 2), ("data", "i", "j", "k")),
}
#: (mode, bias) cases: every mode with and without biases; 3d once each (8 ranks on 2 cores are slow)
GPT_CASES = [(m, b) for m in MESHES if not m.startswith("3d") for b in (True, False)] + [("3d", True),
                                                                                        ("3d+data", False)]
CFG = dict(vocab_size=40, block_size=8, n_layer=2, n_head=4, n_embd=16)


def build(cfg: GPTConfig, seed: int) -> GPT:
    """A float64 GPT with every tensor perturbed, so biases and norm weights are exercised too."""
    model = GPT(cfg, seed=seed, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=torch.float64))
    return model


def data(cfg: GPTConfig, B: int, T: int, seed: int):
    g = torch.Generator().manual_seed(seed + 2)
    idx = torch.randint(0, cfg.vocab_size, (B, T), generator=g)
    tg = torch.randint(0, cfg.vocab_size, (B, T), generator=g)
    tg[0, 0] = -1  # an ignored position
    return idx, tg


def local(mesh, *ts):
    """This data rank's block of each global batch tensor (the batch contract: a model takes local batches)."""
    if mesh is None or "data" not in mesh.names:
        return ts
    nd, d = mesh.size("data"), mesh.coord("data")
    return tuple(t.chunk(nd)[d] for t in ts)


def plan_for(mesh, mode: str, **kw) -> dict:
    data_axes = ("data",) if "data" in mesh.names else ()
    return parallel_plan("gpt", mode.split("+data")[0], data=data_axes, **kw)


def _rel(a, b):
    """Relative error; exactly-zero reference gradients (key biases) are compared at scale 1e-8."""
    return float((a - b).norm() / max(float(b.norm()), 1e-8))


def _steps(mesh, mode, cfg, seed, steps, B, T, plan_kw=None, sp_mode="ring"):
    """``steps`` AdamW steps of the parallelized GPT next to the dense one; the max relative errors.
    ``sp_mode``: the sequence-parallel attention algorithm (``"ring"`` or ``"all_to_all"``)."""
    from meshpar.ops.attention import sequence_parallel

    model = build(cfg, seed)
    ref = copy.deepcopy(model)
    parallelize(model, mesh, plan_for(mesh, mode, **(plan_kw or {})))
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in ref.named_parameters()]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1)
    rp = dict(ref.named_parameters())
    errs = {"loss": 0.0, "grad": 0.0, "param": 0.0}
    for s in range(steps):
        idx, tg = data(cfg, B, T, seed + 10 * s)
        ref_loss = ref(idx, tg)
        with sequence_parallel(mode=sp_mode):
            loss = model(*local(mesh, idx, tg))
        loss = mp.unshard(loss) if isinstance(loss, mp.ShardedTensor) else loss
        for o, l in ((ref_opt, ref_loss), (opt, loss)):
            o.zero_grad()
            l.backward()
        errs["loss"] = max(errs["loss"], abs(float(loss.detach()) - float(ref_loss.detach())) / abs(float(ref_loss)))
        for n, p in model.named_parameters():
            errs["grad"] = max(errs["grad"], _rel(mp.unshard(p.grad), rp[n].grad))
        opt.step()
        ref_opt.step()
    for n, p in model.named_parameters():
        errs["param"] = max(errs["param"], _rel(mp.unshard(p.detach()), rp[n].detach()))
    sharded = sum(isinstance(p, mp.ShardedTensor) and bool(p.spec.sharded_axes()) for p in model.parameters())
    return errs, sharded


@pytest.mark.parametrize("mode,bias", GPT_CASES)
def test_gpt_matches_dense(pool, mode, bias):
    if math.prod(MESHES[mode][0]) > pool.world_size:
        pytest.skip(f"needs {math.prod(MESHES[mode][0])} ranks (MESHPAR_TEST_WORLD={pool.world_size})")
    cfg = GPTConfig(**CFG, bias=bias)
    shape, names = MESHES[mode]
    for errs, sharded in pool.run(_steps, shape, names, mode, cfg, 3, 3, 4, 5):
        assert errs["loss"] < 1e-10 and errs["grad"] < 1e-9 and errs["param"] < 1e-9, errs
        assert sharded > 0


def _logits(mesh, mode, cfg, seed):
    model = build(cfg, seed)
    idx, _ = data(cfg, 4, 5, seed)
    ref = model(idx)
    parallelize(model, mesh, plan_for(mesh, mode))
    out = model(*local(mesh, idx))
    return tuple(out.shape), _rel(mp.unshard(out), ref)


@pytest.mark.parametrize("mode", ["1d", "2d", "3d"])
def test_logits_have_the_logical_vocab(pool, mode):
    """No padding anywhere: the logits are [B, T, vocab_size] in every layout."""
    if math.prod(MESHES[mode][0]) > pool.world_size:
        pytest.skip(f"needs {math.prod(MESHES[mode][0])} ranks (MESHPAR_TEST_WORLD={pool.world_size})")
    cfg = GPTConfig(**CFG)
    for shape, err in pool.run(_logits, *MESHES[mode], mode, cfg, 4):
        assert shape == (4, 5, cfg.vocab_size) and err < 1e-12


def _generate(mesh, cfg, seed):
    model = build(cfg, seed)
    parallelize(model, mesh, plan_for(mesh, "2d"))
    idx, _ = data(cfg, 4, 3, seed)
    return model.generate(idx, 4, temperature=0.8, top_k=5, seed=seed, gather=mp.unshard)


def test_generate_matches_dense(pool):
    cfg = GPTConfig(**CFG)
    idx, _ = data(cfg, 4, 3, 1)
    ref = build(cfg, 1).generate(idx, 4, temperature=0.8, top_k=5, seed=1)
    assert ref.shape == (4, 7) and torch.equal(ref[:, :3], idx)
    out = pool.run(_generate, (2, 2), ("x", "y"), cfg, 1)
    assert all(torch.equal(o, ref) for o in out)


def _indivisible(mesh):
    model = GPT(GPTConfig(vocab_size=37, block_size=8, n_layer=1, n_head=4, n_embd=16))
    try:
        parallelize(model, mesh, parallel_plan("gpt", "1d"))
    except ShardingError as e:
        return str(e), any(isinstance(p, mp.ShardedTensor) for p in model.parameters())
    return None, True


def test_indivisible_vocab_is_refused(pool):
    """A vocabulary that the tensor-parallel size does not divide is refused up front (no padding)."""
    msg, touched = pool.run(_indivisible, (4,), ("tp",))[0]
    assert msg is not None and "wte.weight" in msg and not touched


def test_dense_model_and_bad_inputs():
    cfg = GPTConfig(**CFG)
    model = GPT(cfg)
    assert all(not isinstance(p, mp.ShardedTensor) for p in model.parameters())
    assert model(torch.zeros(2, 3, dtype=torch.long)).shape == (2, 3, cfg.vocab_size)
    with pytest.raises(ValueError, match="exceeds block_size"):
        model(torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="multiple of n_head"):
        GPTConfig(vocab_size=5, block_size=4, n_layer=1, n_head=3, n_embd=8)
    with pytest.raises(ShardingError, match="no 'nope' plan"):
        parallel_plan("gpt", "nope")
