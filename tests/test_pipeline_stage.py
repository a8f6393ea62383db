"""Pipeline stages that build only their own blocks: other stages' parameters stay on the meta
device (per-stage parameter bytes ~ total / stages), and training equals the dense GPT (float64)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import meshpar.nn  # noqa: F401
from meshpar.models.gpt import GPT, GPTConfig
from meshpar.pipeline import Pipeline, build_stage, materialize, materialized_bytes, stage_block_indices

CFG = GPTConfig(vocab_size=32, block_size=8, n_layer=6, n_head=2, n_embd=8)


def make_blocks(cfg: GPTConfig = CFG) -> nn.Sequential:
    """The coupling to the model: the plain GPT (on the meta device under ``build_stage``), as blocks."""
    return GPT(cfg, dtype=torch.float64).pipeline_blocks()


def _dense_state() -> dict[str, torch.Tensor]:
    """Sequential names (``"3.attn.q.weight"``) of the dense GPT's blocks -> values."""
    gpt = GPT(CFG, seed=5, dtype=torch.float64)
    return {n: p.detach().clone() for n, p in gpt.pipeline_blocks().named_parameters()}


def _data():
    g = torch.Generator().manual_seed(7)
    return (torch.randint(0, CFG.vocab_size, (4, 8), generator=g),
            torch.randint(0, CFG.vocab_size, (4, 8), generator=g))


def _loss(logits, targets):
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())


def _stage_rank(mesh, partition):
    state = _dense_state()
    blocks = build_stage(make_blocks, mesh, load=state, partition=partition)
    own = stage_block_indices(len(blocks), mesh.size("pipe"), mesh.coord("pipe"), 1, partition, blocks)
    meta_elsewhere = all(p.is_meta for i, b in enumerate(blocks) if i not in own for p in b.parameters())
    real_here = not any(p.is_meta for i in own for p in blocks[i].parameters())
    pipe = Pipeline(blocks, mesh, _loss, schedule="1f1b", num_microbatches=2, partition=partition)
    held = materialized_bytes(pipe)
    opt = torch.optim.AdamW(pipe.parameters(), lr=0.01)
    x, y = _data()
    losses = []
    for _ in range(2):
        opt.zero_grad()
        losses.append(float(pipe.step(x, y)))
        opt.step()
    params = {n: p.detach().clone() for n, p in pipe.named_block_parameters()}
    opt_bytes = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
                    if isinstance(t, torch.Tensor) and t.ndim > 0)
    return meta_elsewhere, real_here, held, opt_bytes, losses, params


def _dense_reference():
    gpt = GPT(CFG, seed=5, dtype=torch.float64)
    blocks = gpt.pipeline_blocks()
    opt = torch.optim.AdamW(gpt.parameters(), lr=0.01)
    x, y = _data()
    losses = []
    for _ in range(2):
        opt.zero_grad()
        # the pipeline averages the micro-batch losses: the same as the mean over the batch here
        loss = sum(_loss(blocks(xm), ym) for xm, ym in zip(x.chunk(2), y.chunk(2))) / 2
        loss.backward()
        losses.append(float(loss.detach()))
        opt.step()
    return losses, {n: p.detach().clone() for n, p in blocks.named_parameters()}, \
        sum(p.numel() * p.element_size() for p in gpt.parameters())


@pytest.mark.parametrize("partition", ["uniform", "parameters"])
def test_stages_hold_only_their_blocks_and_equal_dense(pool, partition):
    ref_losses, ref_params, total = _dense_reference()
    outs = pool.run(_stage_rank, (2,), ("pipe",), partition)
    held_all = 0
    for meta_elsewhere, real_here, held, opt_bytes, losses, params in outs:
        assert meta_elsewhere and real_here
        assert abs(held - total / 2) <= 0.25 * total        # about total / stages on each rank
        assert opt_bytes == 2 * held                          # Adam moments only for this stage's parameters
        held_all += held
        for a, b in zip(losses, ref_losses):
            assert abs(a - b) < 1e-12
        for n, p in params.items():
            assert torch.allclose(p, ref_params[n], atol=1e-12, rtol=0), n
    assert held_all == total                                  # every parameter lives on exactly one rank


def test_materialize_init_and_errors():
    with torch.device("meta"):
        lin = nn.Linear(3, 4)
    made = materialize(lin, "cpu", init=lambda name, t: t.fill_(2.0 if name.endswith("weight") else 1.0))
    assert made == (12 + 4) * 4 and float(lin.weight.detach().sum()) == 24.0 and float(lin.bias.detach().sum()) == 4.0
    with torch.device("meta"):
        lin = nn.Linear(3, 4)
    with pytest.raises(Exception, match="no value for weight"):
        materialize(lin, "cpu", load={"bias": torch.zeros(4)})
    with torch.device("meta"):
        lin = nn.Linear(3, 4)
    materialize(lin, "cpu")                                   # reset_parameters()
    assert isinstance(lin.weight, nn.Parameter) and not lin.weight.is_meta and torch.isfinite(lin.weight).all()
