"""ZeRO composed with tensor parallelism: ShardedTensor params, data x tp and data x x x y meshes."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import meshpar as mp
from meshpar import P
from meshpar.optim import zero
from meshpar.optim.state import full_param_state

IN, HID, OUT, GB = 6, 8, 3, 8


def weights() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return {"l1.w": torch.randn(IN, HID, generator=g, dtype=torch.float64) * 0.5,
            "l1.b": torch.randn(HID, generator=g, dtype=torch.float64) * 0.1,
            "l2.w": torch.randn(HID, OUT, generator=g, dtype=torch.float64) * 0.5,
            "l2.b": torch.randn(OUT, generator=g, dtype=torch.float64) * 0.1}


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(GB, IN, generator=g, dtype=torch.float64), torch.randn(GB, OUT, generator=g, dtype=torch.float64)


class Lin(nn.Module):
    def __init__(self, w: torch.Tensor, b: torch.Tensor) -> None:
        super().__init__()
        self.w, self.b = nn.Parameter(w), nn.Parameter(b)

    def forward(self, x):
        return x @ self.w + self.b


class MLP(nn.Module):
    def __init__(self, l1: Lin, l2: Lin) -> None:
        super().__init__()
        self.l1, self.l2 = l1, l2

    def forward(self, x):
        return self.l2(torch.tanh(self.l1(x)))


def dense(steps: int, clip: float | None) -> dict[str, torch.Tensor]:
    w = weights()
    model = MLP(Lin(w["l1.w"], w["l1.b"]), Lin(w["l2.w"], w["l2.b"]))
    opt = torch.optim.AdamW(model.parameters(), lr=0.02, weight_decay=0.1)
    for s in range(steps):
        x, y = batch(s)
        ((model(x) - y) ** 2).mean().backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        opt.zero_grad()
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def train_tp(mesh, stage: int, tp, steps: int, clip: float | None):
    w = weights()
    specs = {"l1.w": P(None, tp), "l1.b": P(tp), "l2.w": P(tp, None), "l2.b": P()}
    sh = {k: mp.shard(v, specs[k], mesh) for k, v in w.items()}
    model = MLP(Lin(sh["l1.w"], sh["l1.b"]), Lin(sh["l2.w"], sh["l2.b"]))
    zo = zero(torch.optim.AdamW(model.parameters(), lr=0.02, weight_decay=0.1), mesh, stage=stage, module=model,
              bucket_mb=300 / 2 ** 20, max_grad_norm=clip)
    for s in range(steps):
        x, y = batch(s)
        out = model(mp.shard(x, P("data", None), mesh))
        loss = ((out - mp.shard(y, P("data", None), mesh)) ** 2).mean()
        loss.backward()
        zo.step()
        zo.zero_grad()
    blocks = full_param_state(zo)
    out = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            out[name] = mp.unshard(mp.from_local(blocks[name], p.spec, mesh, p.shape))
    return out


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_data_x_tp(pool, stage):
    want = dense(3, clip=None)
    for res in pool.run(train_tp, (2, 2), ("data", "tp"), stage, "tp", 3, None):
        for k in want:
            torch.testing.assert_close(res[k], want[k], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("stage", [1, 3])
def test_data_x_y_with_clipping(pool, stage):
    want = dense(3, clip=0.1)
    for res in pool.run(train_tp, (2, 2, 2), ("data", "x", "y"), stage, ("x", "y"), 3, 0.1):
        for k in want:
            torch.testing.assert_close(res[k], want[k], rtol=1e-10, atol=1e-10)
