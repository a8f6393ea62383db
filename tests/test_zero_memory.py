"""Measured per-rank model-state bytes vs. the ZeRO formulas; fp16 overflow; bad input."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import meshpar as mp
from meshpar import P
from meshpar.errors import ShardingError
from meshpar.optim import zero


def bf16_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(48, 40), nn.GELU(), nn.Linear(40, 40), nn.GELU(), nn.Linear(40, 8))


def measure(mesh, stage: int):
    model = bf16_model()
    psi = sum(p.numel() for p in model.parameters())
    zo = zero(torch.optim.Adam(model.parameters(), lr=1e-3), mesh, stage=stage, module=model,
              compute_dtype=torch.bfloat16, bucket_mb=4096 / 2 ** 20)
    x = torch.randn(8, 48).to(torch.bfloat16)
    model(x).float().pow(2).mean().backward()
    assert zo.step()
    rep = mp.memory_report(zo, model)
    return psi, len(zo.buckets), rep.as_dict()


FORMULA = {0: lambda psi, nd: 16 * psi, 1: lambda psi, nd: 4 * psi + 12 * psi / nd,
           2: lambda psi, nd: 2 * psi + 14 * psi / nd, 3: lambda psi, nd: 16 * psi / nd}


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_memory_formula(pool, stage):
    for nd in (2, 4, 8):
        for psi, nb, rep in pool.run(measure, (nd,), ("data",), stage):
            want = FORMULA[stage](psi, nd)
            slack = nb * (16 * nd + 4)  # padding to a multiple of nd per bucket, Adam's step scalar
            assert want <= rep["model_states"] <= want + slack, (stage, nd, rep, want)


def overflow(mesh):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))
    zo = zero(torch.optim.SGD(model.parameters(), lr=0.1), mesh, stage=2, module=model,
              compute_dtype=torch.float16)
    before = [p.detach().clone() for p in model.parameters()]
    scale0 = zo.loss_scale
    x = torch.randn(4, 8).half()
    if mesh.coord("data") == 1:
        x = x * 6e4  # overflows fp16 on this rank only
    zo.scale_loss(model(x).float().pow(2).sum()).backward()
    stepped = zo.step()
    unchanged = all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    scale1 = zo.loss_scale
    # a clean step afterwards goes through
    zo.zero_grad()
    zo.scale_loss(model(torch.randn(4, 8).half() * 0.01).float().pow(2).mean() * 1e-3).backward()
    stepped2 = zo.step()
    changed = not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    return stepped, unchanged, scale0, scale1, stepped2, changed


def test_fp16_overflow_skips_everywhere(pool):
    for stepped, unchanged, s0, s1, stepped2, changed in pool.run(overflow, (4,), ("data",)):
        assert not stepped and unchanged
        assert s1 == s0 / 2
        assert stepped2 and changed


def bad(mesh, case: str):
    model = nn.Linear(4, 4).double()
    try:
        if case == "axis":
            zero(torch.optim.SGD(model.parameters(), lr=0.1), mesh, stage=1, axis="dp")
        elif case == "lbfgs":
            zero(torch.optim.LBFGS(model.parameters()), mesh, stage=1)
        elif case == "sharded_over_data":
            w = nn.Parameter(mp.shard(torch.randn(4, 4, dtype=torch.float64), P("data", None), mesh))
            zero(torch.optim.Adam([w]), mesh, stage=1)
        elif case == "stage3_no_module":
            zero(torch.optim.Adam(model.parameters()), mesh, stage=3)
    except (ShardingError, ValueError, TypeError) as e:
        return type(e).__name__, str(e)
    return None


@pytest.mark.parametrize("case,kind,words", [
    ("axis", "ShardingError", ["'dp'", "not in the mesh"]),
    ("lbfgs", "ValueError", ["LBFGS", "unsupported"]),
    ("sharded_over_data", "ShardingError", ["already sharded over the data axis", "Remove 'data'"]),
    ("stage3_no_module", "ValueError", ["module="]),
])
def test_bad_input(pool, case, kind, words):
    for res in pool.run(bad, (2,), ("data",), case):
        assert res is not None and res[0] == kind
        for w in words:
            assert w in res[1], res[1]
