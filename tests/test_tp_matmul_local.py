"""SUMMA 2D / 2.5D / 3D matmuls over local blocks vs dense float64: forward, dX, dW, comm volume."""
from __future__ import annotations

import torch
from hypothesis import given, strategies as st

from meshpar.mesh import CommCounter, pvary
from meshpar.ops.tp.cube import cube_3d
from meshpar.ops.tp.summa import summa_2d, summa_ab, summa_abt, summa_atb

Spec = tuple[tuple[str, ...], ...]


def block(t: torch.Tensor, spec: Spec, mesh) -> torch.Tensor:
    """This rank's block of the global ``t`` under ``spec`` (one axis tuple per dim, major to minor)."""
    for d, axes in enumerate(spec):
        if axes:
            n = mesh.size(axes)
            t = t.chunk(n, dim=d)[mesh.axis_index(axes)]
    return t.contiguous()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / (b.abs().max() + 1e-30))


def _counts(c: CommCounter) -> dict:
    return {k: v for k, v in c.bytes.items()}


# ----------------------------------------------------------------------------- 2-D forms
def _forms(mesh, seed: int, m: int, k: int, n: int):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(m, k, generator=g, dtype=torch.float64)
    B = torch.randn(k, n, generator=g, dtype=torch.float64)
    G = torch.randn(m, n, generator=g, dtype=torch.float64)
    sp = (("x",), ("y",))
    blk = lambda t: block(t, sp, mesh)  # noqa: E731
    return (_rel(summa_ab(blk(A), blk(B), mesh, "x", "y"), blk(A @ B)),
            _rel(summa_abt(blk(G), blk(B), mesh, "x", "y"), blk(G @ B.T)),
            _rel(summa_atb(blk(A), blk(G), mesh, "x", "y"), blk(A.T @ G)))


@given(st.integers(0, 2**16), st.integers(1, 3), st.integers(1, 3), st.integers(1, 3))
def test_summa_forms(pool, seed, m, k, n):
    for errs in pool.run(_forms, (2, 2), ("x", "y"), seed, 2 * m, 2 * k, 2 * n):
        assert max(errs) < 1e-12, errs


# ----------------------------------------------------------------------------- linear 2D / 2.5D
def _linear_2d(mesh, seed: int, b: int, s: int, h: int, n: int, extra: tuple[str, ...], extra_major: bool):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(b, s, h, generator=g, dtype=torch.float64)
    W = torch.randn(h, n, generator=g, dtype=torch.float64)
    GY = torch.randn(b, s, n, generator=g, dtype=torch.float64)
    bat = extra + ("x",) if extra_major else ("x",) + extra
    xs, ws = (bat, (), ("y",)), (("x",), ("y",))
    xl = block(X, xs, mesh).requires_grad_()
    wl = block(W, ws, mesh).requires_grad_()
    with CommCounter() as cf:
        y = summa_2d(xl, pvary(wl, mesh, extra) if extra else wl, mesh, "x", "y")
    with CommCounter() as cb:
        y.backward(block(GY, xs, mesh))
    errs = (_rel(y, block(X @ W, xs, mesh)), _rel(xl.grad, block(GY @ W.T, xs, mesh)),
            _rel(wl.grad, block(torch.einsum("bsh,bsn->hn", X, GY), ws, mesh)))
    return errs, _counts(cf), _counts(cb), xl.numel() * 8, wl.numel() * 8


@given(st.integers(0, 2**16), st.integers(1, 2), st.integers(1, 3), st.integers(1, 3), st.integers(1, 3),
       st.sampled_from([((2, 2), ("x", "y"), ()), ((2, 2, 2), ("d", "x", "y"), ("d",)),
                        ((1, 1), ("x", "y"), ())]),
       st.booleans())
def test_linear_2d_and_25d(pool, seed, b, s, h, n, mesh_def, extra_major):
    shape, names, extra = mesh_def
    q = shape[names.index("x")]
    depth = 2 if extra else 1
    out = pool.run(_linear_2d, shape, names, seed, b * q * depth, s, h * q, n * q, extra, extra_major)
    for errs, cf, cb, xbytes, wbytes in out:
        assert max(errs) < 1e-12, errs
        if q == 1:
            assert not cf and not cb
            continue
        # forward: (q-1)/q of the row's X panels and of the column's W panels
        assert cf == {("y",): (q - 1) * xbytes, ("x",): (q - 1) * wbytes}
        # backward: dX = dY·Wᵀ (W panels along x, dX ring along y); dW = Xᵀ·dY (X panels along y, ring along x)
        expect = {("y",): 2 * (q - 1) * xbytes, ("x",): 2 * (q - 1) * wbytes}
        if extra:
            expect[extra] = 2 * (2 - 1) / 2 * wbytes  # dW all-reduced over depth / data
        assert cb == expect


def _nonsquare(mesh):
    from meshpar.errors import ShardingError
    x = torch.zeros(4, 2, dtype=torch.float64)
    try:
        summa_2d(x, torch.zeros(2, 2, dtype=torch.float64), mesh, "x", "y")
    except ShardingError as e:
        return str(e)
    return None


def test_summa_nonsquare_raises(pool):
    for msg in pool.run(_nonsquare, (2, 4), ("x", "y")):
        assert msg and "square" in msg and "'x' has 2" in msg


# ----------------------------------------------------------------------------- 3D
def _linear_3d(mesh, seed: int, b: int, s: int, h: int, n: int, pre: tuple[str, ...], dim: int, roles: tuple[str, ...]):
    i, j, k = roles
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(b, s, h, generator=g, dtype=torch.float64)
    if dim == 1:
        X = X.transpose(0, 1).contiguous()
    W = torch.randn(h, n, generator=g, dtype=torch.float64)
    Y = X @ W
    GY = torch.randn(Y.shape, generator=g, dtype=torch.float64)
    xs = [(), (), (k,)]
    ys = [(), (), (j,)]
    xs[dim], ys[dim] = pre + (i, j), pre + (i, k)
    ws = ((k,), (j, i))
    xl = block(X, tuple(xs), mesh).requires_grad_()
    wl = block(W, ws, mesh).requires_grad_()
    with CommCounter() as cf:
        y = cube_3d(xl, pvary(wl, mesh, pre) if pre else wl, mesh, i, j, k, dim=dim)
    with CommCounter() as cb:
        y.backward(block(GY, tuple(ys), mesh))
    dW = X.reshape(-1, X.shape[-1]).T @ GY.reshape(-1, GY.shape[-1])
    errs = (_rel(y, block(Y, tuple(ys), mesh)), _rel(xl.grad, block(GY @ W.T, tuple(xs), mesh)),
            _rel(wl.grad, block(dW, ws, mesh)))
    return errs, _counts(cf), _counts(cb), xl.numel() * 8, wl.numel() * 8, y.numel() * 8


@given(st.integers(0, 2**16), st.integers(1, 2), st.integers(1, 3), st.integers(1, 3), st.integers(1, 3),
       st.sampled_from([((2, 2, 2), ("d", "x", "y"), (), ("d", "x", "y")), ((2, 2, 2), ("d", "x", "y"), (), ("y", "d", "x")),
                        ((2, 1, 2, 2), ("data", "i", "j", "k"), ("data",), ("i", "j", "k")),
                        ((2, 1, 2, 2), ("data", "i", "j", "k"), (), ("j", "k", "data"))]),
       st.sampled_from([0, 1]))
def test_linear_3d(pool, seed, b, s, h, n, mesh_def, dim):
    shape, names, pre, roles = mesh_def
    sz = dict(zip(names, shape))
    ni, nj, nk = (sz[r] for r in roles)
    lead = b * ni * nj * nk * (sz[pre[0]] if pre else 1)
    out = pool.run(_linear_3d, shape, names, seed, lead, s, h * nk, n * ni * nj, pre, dim, roles)
    for errs, cf, cb, xb, wb, yb in out:
        assert max(errs) < 1e-12, errs
        ri, rj, rk = ((r,) for r in roles)
        f = {rj: (nj - 1) * xb, ri: (ni - 1) * wb, rk: (nk - 1) * yb}
        assert cf == {k: v for k, v in f.items() if v}, cf
        bwd = {rk: (nk - 1) * yb, ri: 2 * (ni - 1) * wb, rj: 2 * (nj - 1) * xb}
        if pre:
            bwd[pre] = wb
        assert cb == {k: v for k, v in bwd.items() if v}, cb
