"""A GPT checkpoint saved under 2D (2x2) loads under 1D (4) and in one process with the same loss,
and the re-laid optimizer state gives the same next step."""
from __future__ import annotations

import torch

from meshpar.models.gpt import GPT, GPTConfig
from meshpar.train import context_for, initialize, latest_checkpoint, load_full, parallelize_model, save_checkpoint

GCFG = GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=4, n_embd=32)


def _batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, GCFG.vocab_size, (4, GCFG.block_size + 1), generator=g)
    return t[:, :-1], t[:, 1:]


def _engine(mesh, mode: str, seed: int):
    tensor = None if mode == "dense" else dict(size=4, mode=mode)
    ctx = context_for(dict(parallel=dict(data=1, tensor=tensor), seed=seed), mesh=mesh)
    model = parallelize_model(GPT(GCFG, seed=seed, dtype=torch.float64), ctx)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    engine, *_ = initialize(model, opt, None, ctx=ctx)
    return engine


def _train_step(engine, seed: int) -> float:
    x, y = _batch(seed)
    engine.zero_grad()
    loss = engine(x, y)
    engine.backward(loss)
    engine.step()
    return float(loss)


@torch.no_grad()
def _eval(engine, seed: int) -> float:
    x, y = _batch(seed)
    engine.eval()
    out = float(engine(x, y))
    engine.train()
    return out


def _save_2d(mesh, root: str):
    eng = _engine(mesh, "2d", seed=1)
    for s in range(3):
        _train_step(eng, s)
    tensors, extra = eng.state_tensors()
    save_checkpoint(root, 3, tensors, extra, mesh=mesh)
    before = _eval(eng, 100)
    _train_step(eng, 3)
    return before, _eval(eng, 100)


def _load_1d(mesh, root: str):
    eng = _engine(mesh, "1d", seed=2)  # different init: everything must come from the checkpoint
    extra = eng.load_state(str(latest_checkpoint(root)))
    before = _eval(eng, 100)
    _train_step(eng, 3)
    return before, _eval(eng, 100), extra["global_step"]


def test_gpt_2d_to_1d_to_one_process(pool, tmp_path):
    root = str(tmp_path / "ck")
    b2, a2 = pool.run(_save_2d, (1, 2, 2), ("data", "x", "y"), root)[0]
    b1, a1, step = pool.run(_load_1d, (1, 4), ("data", "tp"), root)[0]
    assert step == 3
    assert abs(b1 - b2) < 1e-10 and abs(a1 - a2) < 1e-10, (b2, b1, a2, a1)
    params = load_full(latest_checkpoint(root), "model.")  # one process, no torch.distributed world
    x, y = _batch(100)
    model = GPT(GCFG, dtype=torch.float64)
    model.load_state_dict(params)
    dense = float(model(x, y))
    assert abs(dense - b2) < 1e-10
