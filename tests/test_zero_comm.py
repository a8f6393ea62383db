"""Communication volume per step on the data axis matches each stage's algorithm (CommCounter)."""
from __future__ import annotations

import pytest
import torch

from meshpar.mesh import CommCounter
from meshpar.optim import zero
from test_zero import TINY_MB, batch, make_model, make_opt


def one_step(mesh, stage: int):
    model = make_model()
    zo = zero(make_opt("adamw", model.parameters()), mesh, stage=stage, module=model, bucket_mb=TINY_MB)
    nd, r = mesh.size("data"), mesh.coord("data")
    x, y = batch(0, 0)
    with CommCounter() as c:
        ((model(x.chunk(nd)[r]) - y.chunk(nd)[r]) ** 2).mean().backward()
        zo.step()
    return [b.padded for b in zo.buckets], dict(c.bytes), dict(c.calls)


# bytes received per rank, per padded bucket of B bytes on n data ranks (textbook algorithms)
VOLUME = {0: lambda n, B: 2 * (n - 1) / n * B,          # all-reduce
          1: lambda n, B: 3 * (n - 1) / n * B,          # all-reduce + all-gather of updated params
          2: lambda n, B: 2 * (n - 1) / n * B,          # reduce-scatter + all-gather
          3: lambda n, B: 3 * (n - 1) / n * B}          # gather (fwd) + gather (bwd) + reduce-scatter


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_comm_volume(pool, stage):
    n = 4
    for padded, nbytes, calls in pool.run(one_step, (n,), ("data",), stage):
        want = sum(VOLUME[stage](n, p * 8) for p in padded)  # float64
        assert nbytes[("data",)] == pytest.approx(want), (padded, nbytes, calls)
