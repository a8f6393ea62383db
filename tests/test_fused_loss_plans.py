"""The GPT's chunked loss head under the plans (float64, gloo ranks): where the head's layout allows it
(dense, 1d with and without a data axis, sequence parallel incl. the zigzag layout) the fused path runs
and equals the unfused one (logits + the plan's cross-entropy rule): loss, every parameter gradient;
where it does not (2d splits the feature dim) the GPT falls back to the logits."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

import meshpar as mp
import meshpar.ops.fused_loss as fl
from meshpar.models.gpt import GPT, GPTConfig
from meshpar.models.plans import parallel_plan
from meshpar.parallel import parallelize

CFG = GPTConfig(vocab_size=40, block_size=8, n_layer=1, n_head=4, n_embd=16)


def _grads(mesh, mode: str, balanced: bool):
    calls = []
    real = fl.sharded_fused_linear_cross_entropy

    def spy(*a, **k):
        out = real(*a, **k)
        calls.append(out.spec)
        return out
    fl.sharded_fused_linear_cross_entropy = spy
    try:
        g = torch.Generator().manual_seed(5)
        idx = torch.randint(0, CFG.vocab_size, (4, CFG.block_size), generator=g)
        tgt = torch.randint(0, CFG.vocab_size, (4, CFG.block_size), generator=g)
        tgt[0, 1] = -1
        if "data" in mesh.names:
            n, r = mesh.size("data"), mesh.coord("data")
            idx, tgt = idx.chunk(n)[r], tgt.chunk(n)[r]
        out = {}
        for fused in (True, False):
            model = GPT(dataclasses.replace(CFG, fused_loss=fused), seed=3, dtype=torch.float64)
            data = ("data",) if "data" in mesh.names else ()
            kw = dict(balanced=True) if balanced else {}
            parallelize(model, mesh, parallel_plan("gpt", mode, data=data, **kw))
            loss = model(idx, tgt)
            loss = mp.unshard(loss) if isinstance(loss, mp.ShardedTensor) else loss
            loss.backward()
            out[fused] = (float(loss), {n: mp.unshard(p.grad) for n, p in model.named_parameters()})
        return out, calls
    finally:
        fl.sharded_fused_linear_cross_entropy = real


@pytest.mark.parametrize("mode,shape,names,balanced,fused_runs", [
    ("1d", (4,), ("tp",), False, True),
    ("1d", (2, 2), ("data", "tp"), False, True),
    ("sp", (2, 2), ("data", "sp"), False, True),
    ("sp", (2,), ("sp",), True, True),            # zigzag token layout
    ("2d", (2, 2), ("x", "y"), False, False),     # the feature dim is split: logits + the plan's rule
])
def test_fused_head_in_plans_equals_unfused(pool, mode, shape, names, balanced, fused_runs):
    for (res, calls) in pool.run(_grads, shape, names, mode, balanced):
        (lf, gf), (lu, gu) = res[True], res[False]
        assert abs(lf - lu) <= 1e-12 * abs(lu)
        for n in gu:
            err = float((gf[n] - gu[n]).norm() / max(float(gu[n].norm()), 1e-8))
            assert err < 1e-10, (n, err)
        assert (len(calls) == 1) == fused_runs and all(s == mp.P() for s in calls)


def test_hooked_head_computes_logits_through_the_module():
    """The fused head reads lm_head.weight without calling lm_head: with a hook on lm_head (an offload
    unit's chunk fetch, a user's hook) the GPT calls the module instead, and the loss is the same."""
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, CFG.vocab_size, (2, CFG.block_size), generator=g)
    model = GPT(CFG, seed=3, dtype=torch.float64)
    fused = float(model(idx, idx))
    seen = []
    h = model.lm_head.register_forward_hook(lambda m, a, o: seen.append(o.shape))
    hooked = float(model(idx, idx))
    h.remove()
    assert seen == [torch.Size([2, CFG.block_size, CFG.vocab_size])]
    assert abs(fused - hooked) <= 1e-12 * abs(hooked)
