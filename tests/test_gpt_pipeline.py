"""The GPT as pipeline blocks: loss and every parameter gradient equal the dense GPT (float64),
for pipe alone, pipe x data and pipe x data x tp (1d plan inside the stages); forward-only
evaluation; gathering the stages' weights; and the training engine end to end (clipping over
stages, checkpoints that load without the pipeline)."""
from __future__ import annotations

import math

import pytest
import torch

import meshpar.nn  # noqa: F401  (registers the layer rules)
from meshpar.models.gpt import GPT, GPTConfig, init_params, loss_fn
from meshpar.models.plans import make_plan, unpad
from meshpar.nn.functional import cross_entropy
from meshpar.pipeline import Pipeline
from meshpar.sharding import unshard
from meshpar.sharding.tensor import ShardedTensor

CFG = GPTConfig(vocab_size=37, block_size=8, n_layer=2, n_head=4, n_embd=16)


def _params(cfg: GPTConfig, seed: int) -> dict[str, torch.Tensor]:
    """init_params with every tensor perturbed, so biases and norm weights are exercised too."""
    p = init_params(cfg, seed, torch.float64)
    g = torch.Generator().manual_seed(seed + 1)
    return {n: t + 0.05 * torch.randn(t.shape, generator=g, dtype=torch.float64) for n, t in p.items()}


def _data(cfg: GPTConfig, B: int, T: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed + 2)
    idx = torch.randint(0, cfg.vocab_size, (B, T), generator=g)
    return idx, torch.randint(0, cfg.vocab_size, (B, T), generator=g)


class Loss:
    """Cross-entropy of (possibly sharded, vocab-padded) logits: the example's GPTLoss."""

    def __init__(self, gpt: GPT):
        self.gpt = gpt

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if isinstance(logits, ShardedTensor):
            targets = self.gpt.plan.place(targets, "targets")
        loss = cross_entropy(logits, targets, ignore_index=-1, vocab_size=self.gpt.cfg.vocab_size)
        return unshard(loss) if isinstance(loss, ShardedTensor) else loss


def _full(name: str, t: torch.Tensor) -> torch.Tensor:
    return unpad(name, unshard(t) if isinstance(t, ShardedTensor) else t, CFG)


def _pipe_gpt(mesh, mode: str, schedule: str, m: int, chunks: int):
    plan = make_plan("dense") if mode == "dense" else make_plan(mode, mesh)
    gpt = GPT(CFG, plan, params=_params(CFG, 3))
    x, y = _data(CFG, 8, 6, 3)
    data_axes = None
    if "data" in mesh.names:  # the batch contract: each data replica takes its block of the global batch
        nd, d = mesh.size("data"), mesh.coord("data")
        x, y = x.chunk(nd)[d], y.chunk(nd)[d]
        # plain tensors: the pipeline averages over data; a plan: the sharding core reduces over its axes
        data_axes = "data" if plan.dense else None
    pipe = Pipeline(gpt.pipeline_blocks(), mesh, Loss(gpt), schedule=schedule, num_microbatches=m, chunks=chunks,
                    data_axes=data_axes)
    for _ in range(2):  # the second step runs on cached activation shapes
        pipe.zero_grad(set_to_none=True)
        loss = pipe.step(x, y)
    grads = {name.split(".", 1)[1]: _full(name.split(".", 1)[1], p.grad) for name, p in pipe.named_block_parameters()}
    pipe.eval()
    ev = pipe.evaluate(x, y)
    # gathering: change this rank's stages, then every rank's GPT must hold every stage's change
    with torch.no_grad():
        for p in pipe.parameters():
            (p._local if isinstance(p, ShardedTensor) else p).add_(1.0)
    pipe.gather_blocks(gpt.pipeline_blocks())
    moved = max(float((_full(n, p) - t - 1.0).abs().max()) for (n, p), t in
                zip(gpt.named_parameters(), _params(CFG, 3).values()))
    return float(loss), float(ev), grads, moved


def _reference() -> tuple[float, dict[str, torch.Tensor]]:
    params = {n: t.requires_grad_() for n, t in _params(CFG, 3).items()}
    x, y = _data(CFG, 8, 6, 3)
    loss = loss_fn(params, x, y, CFG)
    loss.backward()
    return float(loss), {n: t.grad for n, t in params.items()}


@pytest.mark.parametrize("mode,shape,names,schedule,m,chunks", [
    ("dense", (2,), ("pipe",), "1f1b", 4, 1),
    ("dense", (2, 4), ("pipe", "data"), "interleaved", 2, 2),      # pipe x data, 2 chunks per rank
    ("1d", (2, 2, 2), ("pipe", "data", "tp"), "1f1b", 2, 1),      # pipe x data x tp
    ("1d", (2, 4), ("pipe", "tp"), "gpipe", 2, 1),                # pipe x tp (padded heads/vocab)
])
def test_gpt_pipeline_equals_dense(pool, mode, shape, names, schedule, m, chunks):
    if math.prod(shape) > pool.world_size:
        pytest.skip("needs an 8-rank pool (MESHPAR_TEST_WORLD=8)")
    ref_loss, ref_grads = _reference()
    res = pool.run(_pipe_gpt, shape, names, mode, schedule, m, chunks)
    assert sum(r[0] for r in res) / len(res) == pytest.approx(ref_loss, rel=1e-12)  # mean over data replicas
    assert sum(r[1] for r in res) / len(res) == pytest.approx(ref_loss, rel=1e-12)  # forward-only evaluation
    seen = set()
    for _, _, grads, moved in res:
        assert moved < 1e-12
        for n, g in grads.items():
            assert g.shape == ref_grads[n].shape, n
            torch.testing.assert_close(g, ref_grads[n], rtol=1e-9, atol=1e-12, msg=n)
            seen.add(n)
    assert seen == set(ref_grads)


def test_gpt_blocks_are_the_model():
    gpt = GPT(CFG, params=_params(CFG, 5))
    blocks = gpt.pipeline_blocks()
    x, _ = _data(CFG, 2, 8, 5)
    assert torch.equal(blocks(x), gpt(x))
    assert [n.split(".", 1)[1] for n, _ in blocks.named_parameters()] == list(gpt.params())
    assert all(a is b for a, b in zip(blocks.parameters(), gpt.parameters()))  # shared, not copied
    with pytest.raises(ValueError, match="no dropout"):
        GPT(GPTConfig(vocab_size=8, block_size=4, n_layer=1, n_head=1, n_embd=4, dropout=0.1)).pipeline_blocks()


# ----------------------------------------------------------------------------- the training engine
ECFG = dict(seed=7, clip_grad_norm=0.05, zero=dict(stage=1))  # a small clip norm: every step clips


def _engine(mesh, pipeline: int, data: int, seed: int):
    from meshpar.train import context_for, initialize
    par = dict(pipeline=pipeline, data=data)
    extra = dict(pipeline_schedule=dict(schedule="1f1b", num_microbatches=2)) if pipeline > 1 else {}
    ctx = context_for(dict(ECFG, parallel=par, **extra), mesh=mesh)
    gpt = GPT(CFG, params=_params(CFG, seed))
    opt = lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1)  # noqa: E731
    engine, *_ = initialize(gpt, opt, Loss(gpt), ctx=ctx)
    return engine


def _shard(mesh, seed: int):
    x, y = _data(CFG, 8, 8, seed)
    nd, d = mesh.size("data"), mesh.coord("data")
    return x.chunk(nd)[d], y.chunk(nd)[d]


def _pipe_engine(mesh, root: str):
    from meshpar.train import save_checkpoint
    engine = _engine(mesh, 2, mesh.size("data"), seed=3)
    losses = []
    for s in range(3):
        engine.zero_grad()
        losses.append(float(engine.train_batch(_shard(mesh, s))))
        engine.step()
        if s == 1:
            tensors, extra = engine.state_tensors()
            save_checkpoint(root, 2, tensors, extra, mesh=mesh)
    gpt = engine.gather_model()
    x, y = _data(CFG, 8, 8, 100)
    return losses, float(loss_fn(gpt.params(), x, y, CFG))


def _dense_resume(mesh, root: str):
    from meshpar.train import latest_checkpoint
    engine = _engine(mesh, 1, mesh.size("data"), seed=9)  # other init: everything comes from the checkpoint
    assert engine.load_state(str(latest_checkpoint(root)))["global_step"] == 2
    engine.zero_grad()
    loss = engine.train_batch(_shard(mesh, 2))
    engine.step()
    x, y = _data(CFG, 8, 8, 100)
    return float(loss), float(loss_fn(engine.model.params(), x, y, CFG))


def _reference_training() -> tuple[list[float], float]:
    """The same three AdamW steps (clipped to the global norm) on the whole batch, in one process."""
    params = {n: t.requires_grad_() for n, t in _params(CFG, 3).items()}
    opt = torch.optim.AdamW(list(params.values()), lr=1e-2, weight_decay=0.1)
    losses = []
    for s in range(3):
        opt.zero_grad()
        loss = loss_fn(params, *_data(CFG, 8, 8, s), CFG)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(params.values()), ECFG["clip_grad_norm"])
        opt.step()
        losses.append(float(loss))
    with torch.no_grad():
        return losses, float(loss_fn(params, *_data(CFG, 8, 8, 100), CFG))


def test_gpt_pipeline_engine_matches_dense_and_resumes_unpipelined(pool, tmp_path):
    ref_losses, ref_after = _reference_training()
    root = str(tmp_path / "ck")
    res = pool.run(_pipe_engine, (2, 2), ("pipe", "data"), root)
    losses = [sum(r[0][s] for r in res) / len(res) for s in range(3)]  # mean over data replicas
    assert losses == pytest.approx(ref_losses, rel=1e-10), (losses, ref_losses)
    assert all(r[1] == pytest.approx(ref_after, rel=1e-10) for r in res)  # gathered GPT on every rank
    # the pipelined checkpoint (GPT names) loads into the plain data-parallel GPT on 4 ranks
    res = pool.run(_dense_resume, (4,), ("data",), root)
    assert sum(r[0] for r in res) / len(res) == pytest.approx(ref_losses[2], rel=1e-10)
    assert all(r[1] == pytest.approx(ref_after, rel=1e-10) for r in res)
