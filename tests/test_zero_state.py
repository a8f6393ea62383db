"""Full (gathered) and sharded (torch.distributed.checkpoint) state dicts of ZeroOptimizer."""
from __future__ import annotations

import torch
import torch.distributed.checkpoint as dcp

from meshpar.optim import zero
from meshpar.optim.state import full_param_state, load_sharded_state_dict, sharded_state_dict
from test_zero import assert_same, batch, dense, make_model, make_opt


def _steps(zo, model, mesh, steps, start=0):
    nd, r = mesh.size("data"), mesh.coord("data")
    for s in range(start, start + steps):
        x, y = batch(s, 0)
        ((model(x.chunk(nd)[r]) - y.chunk(nd)[r]) ** 2).mean().backward()
        zo.step()
        zo.zero_grad()


def full_roundtrip(mesh, stage_a: int, stage_b: int):
    model = make_model()
    zo = zero(make_opt("adamw", model.parameters()), mesh, stage=stage_a, module=model, bucket_mb=200 / 2 ** 20)
    _steps(zo, model, mesh, 2)
    sd = zo.state_dict()
    model2 = make_model(seed=5)  # different init: everything must come from the state dict
    zo2 = zero(make_opt("adamw", model2.parameters()), mesh, stage=stage_b, module=model2, bucket_mb=350 / 2 ** 20)
    zo2.load_state_dict(sd)
    _steps(zo2, model2, mesh, 1, start=2)
    return full_param_state(zo2)


def test_full_state_dict_across_stages(pool):
    want = dense("adamw", steps=3)
    for a, b in ((3, 1), (1, 2), (0, 3)):
        for res in pool.run(full_roundtrip, (4,), ("data",), a, b):
            assert_same(res, want)


def dcp_roundtrip(mesh, stage: int, path: str):
    model = make_model()
    zo = zero(make_opt("adamw", model.parameters()), mesh, stage=stage, module=model, bucket_mb=200 / 2 ** 20)
    _steps(zo, model, mesh, 2)
    pg = mesh.group(mesh.names)  # the mesh may be smaller than the world
    dcp.save(sharded_state_dict(zo), checkpoint_id=path, process_group=pg)
    model2 = make_model(seed=5)
    zo2 = zero(make_opt("adamw", model2.parameters()), mesh, stage=stage, module=model2, bucket_mb=200 / 2 ** 20)
    _steps(zo2, model2, mesh, 1, start=7)  # creates state that the load must overwrite
    sd = sharded_state_dict(zo2)
    dcp.load(sd, checkpoint_id=path, process_group=pg)
    load_sharded_state_dict(zo2, sd)
    _steps(zo2, model2, mesh, 1, start=2)
    return full_param_state(zo2)


def test_sharded_state_dict_dcp(pool, tmp_path):
    want = dense("adamw", steps=3)
    for stage in (1, 3):
        for res in pool.run(dcp_roundtrip, (4,), ("data",), stage, str(tmp_path / f"ck{stage}")):
            assert_same(res, want)
