"""Mesh construction, coordinates, groups and collectives by axis name (gloo)."""
from __future__ import annotations

import pytest
import torch

import meshpar as mp
from meshpar.errors import ShardingError
from meshpar.mesh import CommCounter, collectives as C


def _coords(mesh):
    return mesh.rank, mesh.coords, mesh.axis_index(("y", "x")) if "y" in mesh.names else None


def test_coords_row_major(pool):
    out = pool.run(_coords, (2, 4), ("x", "y"))
    for r, (rank, coords, yx) in enumerate(out):
        assert rank == r
        assert coords == {"x": r // 4, "y": r % 4}
        assert yx == coords["y"] * 2 + coords["x"]


def _collectives(mesh):
    r = mesh.rank
    x = torch.full((2, 3), float(r), dtype=torch.float64)
    res = {}
    with CommCounter() as c:
        res["psum_y"] = C.all_reduce(x, mesh, "y")
        res["ag_x"] = C.all_gather(x, mesh, "x", dim=1)
        res["ag_yx"] = C.all_gather(x[:1], mesh, ("y", "x"), dim=0)
        res["rs_xy"] = C.reduce_scatter(torch.arange(8.0, dtype=torch.float64), mesh, ("x", "y"), dim=0)
        res["bc"] = C.broadcast(x, mesh, "y", src=1)
        res["pp"] = C.ppermute(x, mesh, "y", [(i, (i + 1) % mesh.size("y")) for i in range(mesh.size("y"))])
        res["a2a"] = C.all_to_all(torch.arange(4.0).view(4, 1) + 10 * mesh.coord("y"), mesh, "y", 0, 1)
    return res, dict(c.calls), dict(c.bytes)


def test_collectives_values_and_counts(pool):
    out = pool.run(_collectives, (2, 2), ("x", "y"))
    for r, (res, calls, nbytes) in enumerate(out):
        cx, cy = r // 2, r % 2
        row = [cx * 2 + j for j in range(2)]
        assert torch.equal(res["psum_y"], torch.full((2, 3), float(sum(row)), dtype=torch.float64))
        col = [i * 2 + cy for i in range(2)]
        assert torch.equal(res["ag_x"], torch.cat([torch.full((2, 3), float(c), dtype=torch.float64) for c in col], 1))
        # ("y","x") order: position p = y*2 + x -> mesh rank x*2 + y
        expect = torch.cat([torch.full((1, 3), float(xx * 2 + yy), dtype=torch.float64) for yy in range(2) for xx in range(2)])
        assert torch.equal(res["ag_yx"], expect)
        assert torch.equal(res["rs_xy"], torch.tensor([4.0 * (2 * r) , 4.0 * (2 * r + 1)], dtype=torch.float64))
        assert torch.equal(res["bc"], torch.full((2, 3), float(cx * 2 + 1), dtype=torch.float64))
        assert torch.equal(res["pp"], torch.full((2, 3), float(cx * 2 + (cy - 1) % 2), dtype=torch.float64))
        assert res["a2a"].shape == (2, 2)
        assert torch.equal(res["a2a"][:, 0], torch.arange(2.0) + 2 * cy)
        assert torch.equal(res["a2a"][:, 1], torch.arange(2.0) + 2 * cy + 10)
        assert calls[("y",)] == 4 and calls[("x",)] == 1
        # all_gather over x of 48 bytes: (n-1)*b
        assert nbytes[("x",)] == 48


def _bad_mesh(rank, world):
    try:
        mp.Mesh((4, 4), ("x", "y"))
    except ShardingError as e:
        return str(e)
    return None


def test_mesh_bigger_than_world(pool):
    msgs = pool.run(_bad_mesh, None)
    assert all("needs 16 ranks but the world has 8" in m for m in msgs)


def test_mesh_name_errors():
    with pytest.raises(ShardingError, match="unique"):
        mp.mesh.mesh._validate_shape_names((2, 2), ("x", "x"))
    with pytest.raises(ShardingError, match="2 names"):
        mp.mesh.mesh._validate_shape_names((2, 2, 2), ("x", "y"))


def _default_mesh(mesh):
    with mesh:
        x = mp.shard(torch.arange(8.0), mp.P("x"))
        inner = mp.current_mesh()
    try:
        mp.current_mesh()
        outside = "no error"
    except ShardingError as e:
        outside = str(e)
    return x.mesh == mesh, inner is mesh, tuple(x.local.shape), outside


def test_with_mesh_sets_a_default_for_the_block(pool):
    for same, inner, shape, outside in pool.run(_default_mesh, (2,), ("x",)):
        assert same and inner and shape == (4,)
        assert "no default mesh" in outside
