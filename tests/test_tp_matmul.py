"""SUMMA 2D, 2.5D, 3D and batched matmuls through ``x @ w`` on ShardedTensors vs dense float64.

Each case checks the output spec, forward, dX, dW and dbias (``y + bias`` through the pointwise
rule), and the forward communication volume against the algorithm's formula.
"""
from __future__ import annotations

import torch
from hypothesis import given, strategies as st

from meshpar.errors import ShardingError
from meshpar import strict as mp_strict
from meshpar.mesh import CommCounter
from meshpar.sharding.api import shard, unshard
from meshpar.sharding.spec import P


def _leaf(t: torch.Tensor, spec: P, mesh):
    return shard(t, spec, mesh).requires_grad_()


def _rel(a, b) -> float:
    a = unshard(a) if not isinstance(a, float) else a
    return float((a - b).abs().max() / (b.abs().max() + 1e-30))


def _rand(g, *shape):
    return torch.randn(*shape, generator=g, dtype=torch.float64)


# ----------------------------------------------------------------------------- SUMMA 2D / 2.5D
def _summa_case(mesh, seed: int, b: int, s: int, h: int, n: int, batch: tuple[str, ...], defer: tuple[str, ...]):
    g = torch.Generator().manual_seed(seed)
    X, W, Bi = _rand(g, b, s, h), _rand(g, h, n), _rand(g, n)
    Y = X @ W + Bi
    GY = _rand(g, *Y.shape)
    xs = P(batch, None, "y")
    x, w, bias = _leaf(X, xs, mesh), _leaf(W, P("x", "y"), mesh), _leaf(Bi, P("y"), mesh)
    if defer:  # a data-parallel weight: its gradient stays unreduced over the data axis
        w._meshpar_defer_reduce = defer
    with CommCounter() as c:
        xw = x @ w
    y = xw + bias
    y.backward(shard(GY, y.spec, mesh))
    wgrad = w.grad
    wspec = repr(wgrad.spec)
    if defer:
        from meshpar.sharding.core import reduce_unreduced
        wgrad = reduce_unreduced(wgrad)
    errs = [_rel(y, Y), _rel(x.grad, GY @ W.T), _rel(wgrad, torch.einsum("bsh,bsn->hn", X, GY)),
            _rel(bias.grad, GY.sum((0, 1)))]
    return repr(xw.spec), repr(y.spec), errs, dict(c.bytes), x._local.numel() * 8, w._local.numel() * 8, wspec


@given(st.integers(0, 2**16), st.integers(1, 2), st.integers(1, 2), st.integers(1, 3), st.integers(1, 3),
       st.sampled_from([((2, 2), ("x", "y"), ("x",), ()), ((2, 2, 2), ("d", "x", "y"), ("d", "x"), ()),
                        ((2, 2, 2), ("d", "x", "y"), ("x", "d"), ("d",))]))
def test_summa_2d_and_25d(pool, seed, b, s, h, n, case):
    """2D; 2.5D (depth d major, dW all-reduced over d); data×2D (data minor, dW left unreduced over data)."""
    shape, names, batch, defer = case
    out = pool.run(_summa_case, shape, names, seed, b * 2 * (len(batch)), s, 2 * h, 2 * n, batch, defer)
    for xw_spec, y_spec, errs, nbytes, xb, wb, wspec in out:
        assert wspec == repr(P("x", "y", unreduced=defer))
        assert xw_spec == y_spec == repr(P(batch, None, "y"))
        assert max(errs) < 1e-12, errs
        assert nbytes == {("y",): xb, ("x",): wb}  # (q-1)/q of the row's X panels and column's W panels, q=2


def _summa_plain(mesh, seed: int, m: int, k: int, n: int):
    g = torch.Generator().manual_seed(seed)
    A, B = _rand(g, m, k), _rand(g, k, n)
    GC = _rand(g, m, n)
    a, b = _leaf(A, P("x", "y"), mesh), _leaf(B, P("x", "y"), mesh)
    c = a @ b
    c.backward(shard(GC, c.spec, mesh))
    return repr(c.spec), [_rel(c, A @ B), _rel(a.grad, GC @ B.T), _rel(b.grad, A.T @ GC)]


@given(st.integers(0, 2**16), st.integers(1, 3), st.integers(1, 3), st.integers(1, 3))
def test_summa_plain_2d_operands(pool, seed, m, k, n):
    for spec, errs in pool.run(_summa_plain, (2, 2), ("x", "y"), seed, 2 * m, 2 * k, 2 * n):
        assert spec == repr(P("x", "y"))
        assert max(errs) < 1e-12, errs


# ----------------------------------------------------------------------------- 3D, two layers
def _cube_case(mesh, seed: int, b: int, s: int, h: int, f: int, pre: tuple[str, ...], roles: tuple[str, str, str]):
    i, j, k = roles
    g = torch.Generator().manual_seed(seed)
    X, W1, B1, W2 = _rand(g, b, s, h), _rand(g, h, f), _rand(g, f), _rand(g, f, h)
    H = X @ W1 + B1
    Z = H @ W2
    GZ = _rand(g, *Z.shape)
    x = _leaf(X, P(pre + (i, j), None, k), mesh)
    w1, b1 = _leaf(W1, P(k, (j, i)), mesh), _leaf(B1, P(j), mesh)
    w2 = _leaf(W2, P(j, (k, i)), mesh)
    with CommCounter() as c:
        xw = x @ w1
    hh = xw + b1
    z = hh @ w2
    z.backward(shard(GZ, z.spec, mesh))
    GH = GZ @ W2.T
    flat = lambda t: t.reshape(-1, t.shape[-1])  # noqa: E731
    errs = [_rel(z, Z), _rel(hh, H), _rel(x.grad, GH @ W1.T), _rel(w1.grad, flat(X).T @ flat(GH)),
            _rel(b1.grad, GH.sum((0, 1))), _rel(w2.grad, flat(H).T @ flat(GZ))]
    sizes = (x._local.numel() * 8, w1._local.numel() * 8, xw._local.numel() * 8)
    return repr(xw.spec), repr(z.spec), errs, dict(c.bytes), sizes


@given(st.integers(0, 2**16), st.integers(1, 2), st.integers(1, 2), st.integers(1, 2), st.integers(1, 2),
       st.sampled_from([((2, 2, 2), ("d", "x", "y"), (), ("d", "x", "y")),
                        ((2, 2, 2), ("d", "x", "y"), (), ("x", "y", "d")),
                        ((2, 1, 2, 2), ("data", "i", "j", "k"), ("data",), ("i", "j", "k"))]))
def test_cube_3d_two_layers(pool, seed, b, s, h, f, case):
    shape, names, pre, roles = case
    i, j, k = roles
    sz = dict(zip(names, shape))
    q = 8
    out = pool.run(_cube_case, shape, names, seed, b * q * (2 if pre else 1), s, h * q, f * q, pre, roles)
    for xw_spec, z_spec, errs, nbytes, (xb, wb, yb) in out:
        assert xw_spec == repr(P(pre + (i, k), None, j))
        assert z_spec == repr(P(pre + (i, j), None, k))  # back to the input layout, no swap
        assert max(errs) < 1e-12, errs
        expect = {(j,): (sz[j] - 1) * xb, (i,): (sz[i] - 1) * wb, (k,): (sz[k] - 1) * yb}
        assert nbytes == {k: v for k, v in expect.items() if v}


# ----------------------------------------------------------------------------- batched (attention)
def _batched_case(mesh, seed: int, b: int, heads: int, s: int, d: int, bspec: tuple):
    g = torch.Generator().manual_seed(seed)
    Q, K, V = _rand(g, b, heads, s, d), _rand(g, b, heads, s, d), _rand(g, b, heads, s, d)
    S = Q @ K.transpose(-1, -2)
    O = torch.softmax(S, -1) @ V
    GO = _rand(g, *O.shape)
    q, kt, v = _leaf(Q, P(*bspec), mesh), _leaf(K.transpose(-1, -2).contiguous(), P(*bspec), mesh), _leaf(V, P(*bspec), mesh)
    sc = q @ kt
    probs = shard(torch.softmax(unshard(sc), -1), sc.spec, mesh)
    o = probs @ v
    Qd, Kd, Vd = (t.clone().requires_grad_() for t in (Q, K, V))
    Od = torch.softmax(Qd @ Kd.transpose(-1, -2), -1) @ Vd
    Od.backward(GO)
    o.backward(shard(GO, o.spec, mesh))
    errs = [_rel(sc, S), _rel(o, O), _rel(q.grad, Qd.grad), _rel(kt.grad, Kd.grad.transpose(-1, -2)),
            _rel(v.grad, Vd.grad)]
    return repr(sc.spec), repr(o.spec), errs


@given(st.integers(0, 2**16), st.integers(1, 2), st.integers(1, 2), st.integers(1, 3), st.integers(1, 3),
       st.sampled_from([((2, 2), ("x", "y"), ("x", "y")), ((2, 2, 2), ("d", "x", "y"), (("d", "x"), "y")),
                        ((2, 2, 2), ("d", "x", "y"), (("d", "y"), "x"))]))
def test_batched_attention_layouts(pool, seed, b, heads, s, d, case):
    shape, names, bspec = case
    out = pool.run(_batched_case, shape, names, seed, b * 4, heads * 2, s, d, bspec)
    for sc_spec, o_spec, errs in out:
        assert sc_spec == o_spec == repr(P(*bspec))
        assert max(errs) < 1e-12, errs


# ----------------------------------------------------------------------------- bad input
def _bad(mesh, xshape, xspec, wshape, wspec):
    x = shard(torch.zeros(xshape, dtype=torch.float64), P(*xspec), mesh)
    w = shard(torch.zeros(wshape, dtype=torch.float64), P(*wspec), mesh)
    with CommCounter() as c, mp_strict():  # by default the layouts would be resharded implicitly
        try:
            x @ w
        except ShardingError as e:
            return str(e), c.total_calls
    return None, c.total_calls


def test_summa_non_square_mesh(pool):
    for msg, calls in pool.run(_bad, (2, 4), ("x", "y"), (4, 2, 8), ("x", None, "y"), (8, 8), ("x", "y")):
        assert calls == 0
        assert msg and "square" in msg and "'x' has 2" in msg and "'y' has 4" in msg


def test_mismatched_specs(pool):
    for msg, calls in pool.run(_bad, (2, 2), ("x", "y"), (4, 2, 8), ("x", None, "y"), (8, 8), ("x", None)):
        assert calls == 0
        assert msg and "contraction" in msg and "P('x', None, 'y')" in msg


def test_3d_weight_does_not_fit(pool):
    for msg, calls in pool.run(_bad, (2, 2, 2), ("d", "x", "y"), (8, 2, 8), (("d", "x"), None, "y"),
                               (8, 16), ("y", ("d", "x"))):
        assert calls == 0
        assert msg and "3D" in msg and "P('y', ('x', 'd'))" in msg
