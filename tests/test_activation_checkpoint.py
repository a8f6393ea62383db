"""Activation checkpointing from outside the model equals no checkpointing (float64: values, input
and parameter grads), for nn modules, the GPT's pipeline blocks, a tensor-parallel GPT, and the
chunk manager; the config key."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import meshpar.memory as mm
import meshpar.nn  # noqa: F401  (registers the layer rules)
from meshpar.models.gpt import GPT, GPTConfig
from meshpar.models.gpt import Block as GPTLayer
from meshpar.sharding import unshard
from meshpar.sharding.tensor import ShardedTensor

CFG = GPTConfig(vocab_size=24, block_size=8, n_layer=2, n_head=2, n_embd=8)


class Block(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.ln = nn.LayerNorm(c)
        self.fc = nn.Linear(c, 4 * c)
        self.proj = nn.Linear(4 * c, c)

    def forward(self, x):
        return x + self.proj(torch.nn.functional.gelu(self.fc(self.ln(x))))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.h = nn.ModuleList(Block(6) for _ in range(3))
        self.out = nn.Linear(6, 2)

    def forward(self, x):
        for b in self.h:
            x = b(x)
        return self.out(x)


def _run(model, x):
    x = x.clone().requires_grad_(True)
    y = model(x)
    (y ** 2).sum().backward()
    return y.detach(), x.grad, {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("policy", ["block", "selective"])
def test_nn_module_equals_no_checkpoint(policy):
    x = torch.randn(4, 5, 6, dtype=torch.float64)
    ref = _run(Net().double(), x)
    model = Net().double()
    names = mm.checkpoint_activations(model, policy, blocks="h.*")
    assert names == ["h.0", "h.1", "h.2"]
    got = _run(model, x)
    assert torch.allclose(got[0], ref[0], atol=1e-13, rtol=0) and torch.allclose(got[1], ref[1], atol=1e-13, rtol=0)
    for n in ref[2]:
        assert torch.allclose(got[2][n], ref[2][n], atol=1e-13, rtol=0), n
    assert mm.checkpoint_activations(model, "none") == []
    assert "forward" not in model.h[0].__dict__          # undone


def test_block_policy_saves_memory():
    """The checkpointed backward keeps fewer saved tensors: count them with saved-tensor hooks."""
    def saved(model):
        n = [0]

        def pack(t):
            n[0] += t.numel()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(torch.randn(4, 5, 6, dtype=torch.float64, requires_grad=True)).sum()
        return n[0]
    base = saved(Net().double())
    m = Net().double()
    mm.checkpoint_activations(m, "block", blocks="h.*")
    assert saved(m) < base / 2


def test_errors():
    with pytest.raises(ValueError, match="policy"):
        mm.checkpoint_activations(Net(), "all")
    with pytest.raises(ValueError, match="matches"):
        mm.checkpoint_activations(Net(), "block", blocks="layers.*")


def _gpt_grads(gpt, blocks, idx, tgt):
    loss = torch.nn.functional.cross_entropy(blocks(idx).flatten(0, 1), tgt.flatten())
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in gpt.named_parameters()}


@pytest.mark.parametrize("policy", ["block", "selective"])
def test_gpt_pipeline_blocks(policy):
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, CFG.vocab_size, (2, 8), generator=g)
    tgt = torch.randint(0, CFG.vocab_size, (2, 8), generator=g)
    ref_gpt = GPT(CFG, seed=0, dtype=torch.float64)
    ref = _gpt_grads(ref_gpt, ref_gpt.pipeline_blocks(), idx, tgt)
    gpt = GPT(CFG, seed=0, dtype=torch.float64)
    blocks = gpt.pipeline_blocks()
    mm.checkpoint_activations(blocks, policy, blocks=lambda n, m: isinstance(m, GPTLayer))
    got = _gpt_grads(gpt, blocks, idx, tgt)
    assert torch.allclose(got[0], ref[0], atol=1e-13, rtol=0)
    for n in ref[1]:
        assert torch.allclose(got[1][n], ref[1][n], atol=1e-12, rtol=0), n


def _tp_rank(mesh, policy):
    from meshpar.models.plans import parallel_plan, place_batch
    from meshpar.parallel import parallelize
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, CFG.vocab_size, (2, 8), generator=g)
    tgt = torch.randint(0, CFG.vocab_size, (2, 8), generator=g)
    gpt = parallelize(GPT(CFG, seed=0, dtype=torch.float64), mesh, parallel_plan("gpt", "1d"))
    blocks = gpt.pipeline_blocks()
    mm.checkpoint_activations(blocks, policy, blocks=lambda n, m: isinstance(m, GPTLayer))
    logits = blocks(idx)
    tgt = place_batch(tgt, logits.spec.__class__(*(logits.spec[i] for i in range(2))), mesh, ())
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, CFG.vocab_size), tgt.reshape(-1))
    loss = unshard(loss) if isinstance(loss, ShardedTensor) else loss
    loss.backward()
    return float(loss), {n: unshard(p.grad) if isinstance(p.grad, ShardedTensor) else p.grad
                         for n, p in gpt.named_parameters()}


@pytest.mark.parametrize("policy", ["block", "selective"])
def test_tensor_parallel_gpt(pool, policy):
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, CFG.vocab_size, (2, 8), generator=g)
    tgt = torch.randint(0, CFG.vocab_size, (2, 8), generator=g)
    ref_gpt = GPT(CFG, seed=0, dtype=torch.float64)
    ref_loss, ref_grads = _gpt_grads(ref_gpt, ref_gpt.pipeline_blocks(), idx, tgt)
    for loss, grads in pool.run(_tp_rank, (2,), ("tp",), policy):
        assert abs(loss - float(ref_loss)) < 1e-12
        for n in ref_grads:
            assert torch.allclose(grads[n], ref_grads[n], atol=1e-12, rtol=0), n


def test_with_chunk_manager():
    """Checkpointed units under the offload manager with a one-unit budget train as without either."""
    x = torch.randn(4, 5, 6, dtype=torch.float64)

    ref = Net().double()
    opt = torch.optim.AdamW(ref.parameters(), lr=0.01)
    for _ in range(3):
        opt.zero_grad()
        (ref(x) ** 2).sum().backward()
        opt.step()
    model = Net().double()
    mm.checkpoint_activations(model, "block", blocks="h.*")
    units = [model.h[0], model.h[1], model.h[2], model.out]
    per_unit = max(sum(p.numel() for p in u.parameters()) for u in units)
    off = mm.offload(model, units=units, device="simulated", device_budget=per_unit * 8, chunk_numel=per_unit,
                     lr=0.01, memory="host")
    for _ in range(3):
        (model(x) ** 2).sum().backward()
        off.step()
    got = off.master_params()
    off.close()
    for n, p in ref.named_parameters():
        assert torch.allclose(got[n], p.detach(), atol=1e-12, rtol=0), n
    assert off.mgr.stats["evictions"] > 0


def test_config_key():
    from meshpar.train.config import ConfigError, load_config
    assert load_config({})["activation_checkpoint"] == "none"
    assert load_config({"activation_checkpoint": "Block"})["activation_checkpoint"] == "block"
    with pytest.raises(ConfigError, match="activation_checkpoint"):
        load_config({"activation_checkpoint": "everything"})
