"""reshard correctness and communication volume; shard_map; bad input errors (no hangs)."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, strategies as st

import meshpar as mp
from meshpar import P
from meshpar.errors import ShardingError
from meshpar.mesh import CommCounter
from meshpar.mesh import autograd as A
from strategies import MESHES, spec_for


def _reshard_case(mesh, seed, shape, src, tgt):
    x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    xs = mp.shard(x, src, mesh).requires_grad_()
    with CommCounter() as c:
        y = mp.reshard(xs, tgt)
    ok_local = torch.equal(y._local, x[mp.sharding.block_slices(shape, tgt, mesh)])
    g = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 7))
    (mp.unshard(y) * g).sum().backward()
    ok_grad = torch.allclose(mp.unshard(xs.grad), g)
    return ok_local, ok_grad, y.spec, dict(c.bytes), xs._local.numel() * 8


@given(mesh=st.sampled_from(MESHES), data=st.data(), seed=st.integers(0, 99))
def test_reshard_property(pool, mesh, data, seed):
    mshape, names = mesh
    sizes = dict(zip(names, mshape))
    nd = data.draw(st.integers(1, 3))
    total = math.prod(mshape)
    shape = tuple(total * data.draw(st.integers(1, 2)) for _ in range(nd))
    src = data.draw(spec_for(names, sizes, shape))
    tgt = data.draw(spec_for(names, sizes, shape))
    for ok_local, ok_grad, spec, *_ in pool.run(_reshard_case, mshape, names, seed, shape, src, tgt):
        assert ok_local and ok_grad and spec == tgt


def test_reshard_volumes(pool):
    # all-gather over n ranks: each rank receives (n-1)/n of the tensor = (n-1) local blocks
    for ok_l, ok_g, spec, nbytes, local_bytes in pool.run(_reshard_case, (4,), ("x",), 0, (8, 4), P("x"), P()):
        assert ok_l and ok_g and nbytes[("x",)] == 3 * local_bytes
    # all-to-all moves (n-1)/n of the local block
    for ok_l, ok_g, spec, nbytes, local_bytes in pool.run(_reshard_case, (4,), ("x",), 1, (8, 4), P("x"), P(None, "x")):
        assert ok_l and ok_g and nbytes[("x",)] == 3 / 4 * local_bytes
    # replicated -> sharded: free
    for ok_l, ok_g, spec, nbytes, local_bytes in pool.run(_reshard_case, (2, 2), ("x", "y"), 2, (4, 4), P(), P("y", "x")):
        assert ok_l and ok_g and sum(nbytes.values()) == 0


def _unreduced_case(mesh):
    x = torch.arange(8.0, dtype=torch.float64).reshape(4, 2)
    part = mp.from_local(x * (mesh.rank + 1), P(unreduced=["x"]), mesh)
    with CommCounter() as c:
        rs = mp.reshard(part, P("x"))
    full = mp.unshard(mp.reshard(part, P()))
    return rs._local, full, c.by_kind["reduce_scatter"], c.bytes[("x",)]


def test_unreduced_reduce_scatter(pool):
    out = pool.run(_unreduced_case, (2,), ("x",))
    x = torch.arange(8.0, dtype=torch.float64).reshape(4, 2)
    for r, (rs, full, n_rs, nbytes) in enumerate(out):
        assert torch.equal(full, 3 * x)
        assert torch.equal(rs, (3 * x)[2 * r: 2 * r + 2])
        assert n_rs == 1 and nbytes == 0.5 * 64


def _shard_map_case(mesh):
    X = torch.randn(8, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    W = torch.randn(6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    Xs = X.clone().requires_grad_()
    Ws = W.clone().requires_grad_()

    def row_parallel(x, w):  # x [8, 6/n], w [6/n, 4]
        return A.psum(x @ w, mesh, "x")

    f = mp.shard_map(row_parallel, mesh, in_specs=(P(None, "x"), P("x", None)), out_specs=P())
    y = f(Xs, Ws)
    (mp.unshard(y) ** 2).sum().backward()
    Xr, Wr = X.clone().requires_grad_(), W.clone().requires_grad_()
    ((Xr @ Wr) ** 2).sum().backward()
    return (torch.allclose(mp.unshard(y), Xr @ Wr), torch.allclose(Xs.grad, Xr.grad), torch.allclose(Ws.grad, Wr.grad))


def test_shard_map(pool):
    for r in pool.run(_shard_map_case, (2,), ("x",)):
        assert all(r)


# ---------------------------------------------------------------- bad input
def _errors(mesh):
    msgs = {}
    cases = {
        "unknown_axis": lambda: mp.shard(torch.zeros(4, 4), P("q"), mesh),
        "axis_twice": lambda: mp.shard(torch.zeros(4, 4), P("x", "x"), mesh),
        "spec_too_long": lambda: mp.shard(torch.zeros(4), P(None, "x"), mesh),
        "not_divisible": lambda: mp.shard(torch.zeros(3, 4), P("x"), mesh),
        "matmul_no_rule": lambda: mp.shard(torch.zeros(4, 4), P("x", "y"), mesh) @ mp.shard(torch.zeros(4, 4), P(None, "x"), mesh),
        "softmax_split": lambda: torch.softmax(mp.shard(torch.zeros(4, 4), P(None, "x"), mesh), dim=-1),
        "reshape_minor": lambda: mp.shard(torch.zeros(4, 4), P(None, "x"), mesh).reshape(16),
        "index_split": lambda: mp.shard(torch.zeros(4, 4), P("x"), mesh)[1],
    }
    with CommCounter() as c, mp.strict():  # by default the op cases reshard implicitly; strict refuses
        for k, fn in cases.items():
            try:
                fn()
                msgs[k] = None
            except ShardingError as e:
                msgs[k] = str(e)
    return msgs, c.total_calls


def test_bad_input_errors_before_any_collective(pool):
    msgs, calls = pool.run(_errors, (2, 2), ("x", "y"))[0]
    assert calls == 0, "errors must be raised before any collective"
    assert "unknown mesh axis 'q'" in msgs["unknown_axis"]
    assert "used twice" in msgs["axis_twice"]
    assert "drop the extra entries" in msgs["spec_too_long"]
    assert "dim 0 has size 3, not divisible" in msgs["not_divisible"] and "pad dim 0" in msgs["not_divisible"]
    assert "contraction" in msgs["matmul_no_rule"] and "P(" in msgs["matmul_no_rule"]
    assert "split over ('x',)" in msgs["softmax_split"]
    assert "reshard" in msgs["reshape_minor"]
    assert "integer indexing along dim 0" in msgs["index_split"]


def _two_meshes(rank, world):
    a = mp.Mesh((2,), ("x",))
    b = mp.Mesh((4,), ("x",))
    if rank >= 2:
        return None
    try:
        mp.shard(torch.zeros(4), P("x"), a) + mp.shard(torch.zeros(4), P("x"), b)
    except ShardingError as e:
        return str(e)


def test_tensors_from_different_meshes(pool):
    msgs = pool.run(_two_meshes, None)
    assert "different meshes" in msgs[0]


def _timeout_case(rank, world):
    from meshpar.mesh import Mesh, collectives as C
    from meshpar.errors import CollectiveTimeout
    short = Mesh((2,), ("x",), timeout_s=3)  # built by every world rank: mesh construction is collective
    if rank != 0:
        return "skipped"  # rank 1 never joins the all-reduce
    try:
        with C.op_name("matmul"):
            C.all_reduce(torch.ones(2), short, "x")
    except CollectiveTimeout as e:
        return str(e)
    return None


def test_collective_timeout_names_op_and_axis(pool):
    out = pool.run(_timeout_case, None)
    assert "('x',)" in out[0] and "'matmul'" in out[0] and "timed out" in out[0]
