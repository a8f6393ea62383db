"""shard_map with JAX-style collectives by axis name, and its replication check (check_rep).

Every collective is checked against the dense computation in float64: forward value, and the
gradient of the global input (through shard/unshard), on a 2x2 gloo mesh.
"""
from __future__ import annotations

import pytest
import torch

import meshpar as mp
from meshpar import P


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _err(a, b) -> float:
    return float((a - b).abs().max()) if a.numel() else 0.0


def _check(mesh, name, f, in_specs, out_specs, dense, shapes, seed=0):
    """Run ``shard_map(f)`` on global float64 inputs and compare value and input grads to ``dense``."""
    xs = [torch.randn(s, dtype=torch.float64, generator=_gen(seed + i)) for i, s in enumerate(shapes)]
    ref_in = [x.clone().requires_grad_() for x in xs]
    ref = dense(*ref_in)
    g = torch.randn(ref.shape, dtype=torch.float64, generator=_gen(seed + 100))
    (ref * g).sum().backward()
    sh_in = [x.clone().requires_grad_() for x in xs]
    out = mp.shard_map(f, mesh, in_specs, out_specs)(*sh_in)
    full = mp.unshard(out)
    (full * g).sum().backward()
    errs = [_err(full.detach(), ref.detach())] + [_err(a.grad, b.grad) for a, b in zip(sh_in, ref_in)]
    return name, errs


def _collectives_case(mesh):
    ai = mp.axis_index
    res = []
    # psum over one axis: row-parallel matmul (x split on its columns over y, w on its rows)
    res.append(_check(mesh, "psum", lambda x, w: mp.psum(x @ w, "y"), (P(None, "y"), P("y", None)), P(),
                      lambda x, w: x @ w, [(4, 6), (6, 3)]))
    # psum over a tuple of axes
    res.append(_check(mesh, "psum_xy", lambda x, w: mp.psum(x @ w, ("x", "y")), (P(None, ("x", "y")), P(("x", "y"))),
                      P(), lambda x, w: x @ w, [(3, 8), (8, 2)]))
    # explicit mesh positional and keyword forms inside shard_map too
    res.append(_check(mesh, "psum_explicit", lambda x, w: mp.psum(x @ w, mesh, "y") + 0 * mp.psum(x @ w, "y", mesh=mesh),
                      (P(None, "y"), P("y", None)), P(), lambda x, w: x @ w, [(4, 6), (6, 3)]))
    res.append(_check(mesh, "pmean", lambda x: mp.pmean(x, "x"), (P("x"),), P(),
                      lambda x: (x[:2] + x[2:]) / 2, [(4, 3)]))
    # all_gather: tiled concatenates, untiled stacks on a new dim
    res.append(_check(mesh, "all_gather_tiled", lambda x: 2 * mp.all_gather(x, "x", dim=0, tiled=True), (P("x"),), P(),
                      lambda x: 2 * x, [(4, 3)]))
    res.append(_check(mesh, "all_gather_dim1", lambda x: mp.all_gather(x, "y", dim=1, tiled=True) ** 2,
                      (P(None, "y"),), P(), lambda x: x ** 2, [(2, 6)]))
    res.append(_check(mesh, "all_gather_stack", lambda x: mp.all_gather(x, "x", dim=0), (P("x"),), P(),
                      lambda x: x.reshape(2, 2, 3), [(4, 3)]))
    # psum_scatter: a replicated input used per rank needs pvary (its gradient is the sum of the shares)
    res.append(_check(mesh, "psum_scatter_tiled",
                      lambda x: mp.psum_scatter(mp.pvary(x, "x") * (ai("x") + 1), "x", dim=0, tiled=True),
                      (P(),), P("x"), lambda x: 3 * x, [(4, 3)]))
    res.append(_check(mesh, "psum_scatter_untiled",
                      lambda x: mp.psum_scatter(mp.pvary(x, "y") * (ai("y") + 1), "y", dim=1),
                      (P(),), P("y"), lambda x: 3 * x.T.reshape(-1), [(3, 2)]))
    # ppermute: swap the two halves along x
    res.append(_check(mesh, "ppermute", lambda x: mp.ppermute(x, "x", [(0, 1), (1, 0)]), (P("x"),), P("x"),
                      lambda x: torch.cat([x[2:], x[:2]]), [(4, 3)]))
    res.append(_check(mesh, "ppermute_kw", lambda x: mp.ppermute(x, "y", perm=[(0, 1)]), (P(None, "y"),), P(None, "y"),
                      lambda x: torch.cat([torch.zeros_like(x[:, :2]), x[:, :2]], 1), [(3, 4)]))
    # all_to_all: rows-split -> columns-split is the identity on the global value
    res.append(_check(mesh, "all_to_all", lambda x: mp.all_to_all(x, "x", split_dim=1, concat_dim=0), (P("x"),),
                      P(None, "x"), lambda x: x, [(4, 6)]))
    res.append(_check(mesh, "all_to_all_pos", lambda x: mp.all_to_all(x, "y", 0, 1), (P(None, "y"),),
                      P("y"), lambda x: x, [(4, 6)]))
    # axis_index / axis_size
    res.append(_check(mesh, "axis_index",
                      lambda x: x * (ai("x") + 10 * ai(("y", "x"))) + mp.axis_size(("x", "y")),
                      (P(("x", "y")),), P(("x", "y")),
                      lambda x: x * torch.tensor([0, 0, 20, 20, 11, 11, 31, 31], dtype=x.dtype)[:, None] + 4, [(8, 2)]))
    return res


def test_collectives_by_name(pool):
    res = pool.run(_collectives_case, (2, 2), ("x", "y"))
    for rank_res in res:
        for name, errs in rank_res:
            assert max(errs) < 1e-12, (name, errs)


def _explicit_outside_case(mesh):
    x = torch.full((2,), float(mesh.rank + 1), dtype=torch.float64)
    got = {"pos": mp.psum(x, mesh, "x"), "kw": mp.psum(x, ("x", "y"), mesh=mesh),
           "index": mp.axis_index(mesh, "y"), "size": mp.axis_size("x", mesh=mesh),
           "gather": mp.all_gather(x, mesh, "y", dim=0, tiled=True)}
    try:
        mp.psum(x, "x")
        got["outside"] = None
    except mp.ShardingError as e:
        got["outside"] = str(e)
    return got


def test_explicit_mesh_outside_shard_map(pool):
    res = pool.run(_explicit_outside_case, (2, 2), ("x", "y"))
    for r, got in enumerate(res):
        x, y = divmod(r, 2)
        assert torch.equal(got["pos"], torch.full((2,), float((y + 1) + (y + 3)), dtype=torch.float64))
        assert torch.equal(got["kw"], torch.full((2,), 10.0, dtype=torch.float64))
        assert got["index"] == y and got["size"] == 2
        assert got["gather"].tolist() == [2 * x + 1] * 2 + [2 * x + 2] * 2
        assert "shard_map" in got["outside"] and "mesh" in got["outside"]


def test_no_mesh_outside_shard_map_is_an_error():
    with pytest.raises(mp.ShardingError, match="inside a function run by meshpar.shard_map"):
        mp.all_gather(torch.ones(2), "x", dim=0)
    with pytest.raises(mp.ShardingError, match="no mesh is known"):
        mp.axis_index("x")


def _check_rep_case(mesh):
    X = torch.randn(4, 3, dtype=torch.float64, generator=_gen(0))
    msgs = {}

    def attempt(key, f, out_specs, **kw):
        try:
            out = mp.shard_map(f, mesh, (P("x"),), out_specs, **kw)(X)
            msgs[key] = ("ok", out)
        except mp.ShardingError as e:
            msgs[key] = ("error", str(e))

    attempt("split_as_replicated", lambda x: x, P())                       # differs across x
    attempt("pytree", lambda x: {"a": mp.psum(x, "x"), "b": x * 2}, {"a": P(), "b": P()})
    attempt("opt_out", lambda x: x, P(), check_rep=False)
    attempt("good", lambda x: mp.psum(x, "x"), P())
    attempt("unreduced_ok", lambda x: x, P(unreduced=("x",)))
    attempt("by_y", lambda x: x * (mp.axis_index("y") + 1), P("x"))       # differs across y
    attempt("tuple_out", lambda x: (mp.psum(x, "x"), x), (P(), P("x")))
    attempt("unknown_axis", lambda x: mp.psum(x, "z"), P())
    # after shard_map returns, the by-name form has no mesh again
    try:
        mp.psum(X, "x")
        msgs["after"] = ("ok", None)
    except mp.ShardingError as e:
        msgs["after"] = ("error", str(e))
    return {k: (v[0], v[1] if v[0] == "error" else mp.unshard(v[1]) if isinstance(v[1], mp.ShardedTensor) else None)
            for k, v in msgs.items()}


def test_check_rep(pool):
    X = torch.randn(4, 3, dtype=torch.float64, generator=_gen(0))
    for got in pool.run(_check_rep_case, (2, 2), ("x", "y")):
        kind, msg = got["split_as_replicated"]
        assert kind == "error" and "output (out_spec P())" in msg and "('x',)" in msg and "check_rep=False" in msg
        kind, msg = got["pytree"]
        assert kind == "error" and "output['b']" in msg and "output['a']" not in msg
        assert got["opt_out"][0] == "ok"
        assert got["good"][0] == "ok" and torch.equal(got["good"][1], X[:2] + X[2:])
        assert got["unreduced_ok"][0] == "ok" and torch.allclose(got["unreduced_ok"][1], X[:2] + X[2:])
        kind, msg = got["by_y"]
        assert kind == "error" and "('y',)" in msg and "P('x')" in msg
        assert got["tuple_out"][0] == "ok"
        kind, msg = got["unknown_axis"]
        assert kind == "error" and "'z'" in msg and "('x', 'y')" in msg
        assert got["after"][0] == "error"
