"""The plain GPT as pipeline blocks: loss and every parameter gradient equal the dense GPT (float64),
for pipe alone, pipe x data and pipe x data x tp (the "gpt" 1d plan applied by ``parallelize`` before
the split); forward-only evaluation; gathering the stages' weights; and the training engine end to end
(clipping over stages, checkpoints that load without the pipeline)."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import meshpar as mp
from meshpar.models.gpt import GPT, GPTConfig
from meshpar.models.plans import parallel_plan, place_batch
from meshpar.parallel import parallelize
from meshpar.pipeline import Pipeline

CFG = GPTConfig(vocab_size=40, block_size=8, n_layer=2, n_head=4, n_embd=16)


def build(cfg: GPTConfig, seed: int) -> GPT:
    """A float64 GPT with every tensor perturbed, so biases and norm weights are exercised too."""
    model = GPT(cfg, seed=seed, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=torch.float64))
    return model


def _data(cfg: GPTConfig, B: int, T: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed + 2)
    idx = torch.randint(0, cfg.vocab_size, (B, T), generator=g)
    return idx, torch.randint(0, cfg.vocab_size, (B, T), generator=g)


def loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The example's criterion: the targets take the logits' batch layout; a plain scalar."""
    if isinstance(logits, mp.ShardedTensor):
        spec = mp.P(*(logits.spec[i] if i < len(logits.spec) else None for i in range(2)))
        # a plain tensor is this data rank's local batch (the batch contract); a ShardedTensor is resharded
        targets = place_batch(targets, spec, logits.mesh, ("data",) if "data" in logits.mesh.names else ())
    out = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-1)
    return mp.unshard(out) if isinstance(out, mp.ShardedTensor) else out


def _full(t: torch.Tensor) -> torch.Tensor:
    return mp.unshard(t) if isinstance(t, mp.ShardedTensor) else t


def _pipe_gpt(mesh, mode: str, schedule: str, m: int, chunks: int):
    gpt = build(CFG, 3)
    start = {n: p.detach().clone() for n, p in gpt.named_parameters()}
    if mode != "dense":
        parallelize(gpt, mesh, parallel_plan("gpt", mode, data=("data",) if "data" in mesh.names else ()),
                    pipe_axes=("pipe",))
    names = {id(p): n for n, p in gpt.named_parameters()}
    x, y = _data(CFG, 8, 6, 3)
    data_axes = None
    if "data" in mesh.names:  # the batch contract: each data replica takes its block of the global batch
        nd, d = mesh.size("data"), mesh.coord("data")
        x, y = x.chunk(nd)[d], y.chunk(nd)[d]
        # plain tensors: the pipeline averages over data; a plan: the sharding core reduces over its axes
        data_axes = "data" if mode == "dense" else None
        if mode != "dense":  # the engine's placement: this data rank's block, from_local over "data"
            x, y = mp.from_local(x, mp.P("data"), mesh), mp.from_local(y, mp.P("data"), mesh)
    pipe = Pipeline(gpt.pipeline_blocks(), mesh, loss, schedule=schedule, num_microbatches=m, chunks=chunks,
                    data_axes=data_axes)
    for _ in range(2):  # the second step runs on cached activation shapes
        pipe.zero_grad(set_to_none=True)
        out = pipe.step(x, y)
    grads = {names[id(p)]: _full(p.grad) for p in pipe.parameters()}
    pipe.eval()
    ev = pipe.evaluate(x, y)
    # gathering: change this rank's stages, then every rank's GPT must hold every stage's change
    with torch.no_grad():
        for p in pipe.parameters():
            (p._local if isinstance(p, mp.ShardedTensor) else p).add_(1.0)
    pipe.gather_blocks(gpt.pipeline_blocks())
    moved = max(float((_full(p) - start[n] - 1.0).abs().max()) for n, p in gpt.named_parameters())
    return float(out), float(ev), grads, moved


def _reference() -> tuple[float, dict[str, torch.Tensor]]:
    gpt = build(CFG, 3)
    x, y = _data(CFG, 8, 6, 3)
    out = gpt(x, y)
    out.backward()
    return float(out), {n: p.grad for n, p in gpt.named_parameters()}


@pytest.mark.parametrize("mode,shape,names,schedule,m,chunks", [
    ("dense", (2,), ("pipe",), "1f1b", 4, 1),
    ("dense", (2, 4), ("pipe", "data"), "interleaved", 2, 2),      # pipe x data, 2 chunks per rank
    ("1d", (2, 2, 2), ("pipe", "data", "tp"), "1f1b", 2, 1),      # pipe x data x tp
    ("1d", (2, 2), ("pipe", "tp"), "gpipe", 2, 1),                # pipe x tp
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
    gpt = build(CFG, 5)
    blocks = gpt.pipeline_blocks()
    x, _ = _data(CFG, 2, 8, 5)
    assert torch.equal(blocks(x), gpt(x))
    assert {id(p) for p in blocks.parameters()} == {id(p) for p in gpt.parameters()}  # shared, not copied


# ----------------------------------------------------------------------------- the training engine
ECFG = dict(seed=7, clip_grad_norm=0.05, zero=dict(stage=1))  # a small clip norm: every step clips


def _engine(mesh, pipeline: int, data: int, seed: int):
    from meshpar.train import context_for, initialize
    par = dict(pipeline=pipeline, data=data)
    extra = dict(pipeline_schedule=dict(schedule="1f1b", num_microbatches=2)) if pipeline > 1 else {}
    ctx = context_for(dict(ECFG, parallel=par, **extra), mesh=mesh)
    gpt = build(CFG, seed)
    opt = lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1)  # noqa: E731
    engine, *_ = initialize(gpt, opt, loss, ctx=ctx)
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
    with torch.no_grad():
        return losses, float(gpt(x, y))


def _dense_resume(mesh, root: str):
    from meshpar.train import latest_checkpoint
    engine = _engine(mesh, 1, mesh.size("data"), seed=9)  # other init: everything comes from the checkpoint
    assert engine.load_state(str(latest_checkpoint(root)))["global_step"] == 2
    engine.zero_grad()
    loss = engine.train_batch(_shard(mesh, 2))
    engine.step()
    x, y = _data(CFG, 8, 8, 100)
    with torch.no_grad():
        return float(loss), float(engine.model(x, y))


def _reference_training() -> tuple[list[float], float]:
    """The same three AdamW steps (clipped to the global norm) on the whole batch, in one process."""
    gpt = build(CFG, 3)
    opt = torch.optim.AdamW(gpt.parameters(), lr=1e-2, weight_decay=0.1)
    losses = []
    for s in range(3):
        opt.zero_grad()
        out = gpt(*_data(CFG, 8, 8, s))
        out.backward()
        torch.nn.utils.clip_grad_norm_(gpt.parameters(), ECFG["clip_grad_norm"])
        opt.step()
        losses.append(float(out))
    with torch.no_grad():
        return losses, float(gpt(*_data(CFG, 8, 8, 100)))


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
