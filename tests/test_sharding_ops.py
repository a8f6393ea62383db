"""Property tests: every generic rule equals the dense op in float64 (forward, input gradients),
with the expected output spec, on gloo meshes of 1-8 ranks."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st

import meshpar as mp
from meshpar import P
from meshpar.mesh import CommCounter
from strategies import MESHES, mesh_spec_shape

TOL = dict(rtol=1e-10, atol=1e-10)


def _leaf(t, spec, mesh):
    return mp.shard(t.detach().clone(), spec, mesh).requires_grad_()


def _compare(mesh, seed, dense_fn, sharded_fn, inputs, specs):
    """Run both, backprop a random cotangent, return (fwd_err, [grad_err...], out_spec, comm_fwd)."""
    xs = [t.clone().requires_grad_() for t in inputs]
    ref = dense_fn(*xs)
    g = torch.randn(ref.shape, dtype=ref.dtype, generator=torch.Generator().manual_seed(seed + 1))
    (ref * g).sum().backward()
    sts = [_leaf(t, s, mesh) for t, s in zip(inputs, specs)]
    with CommCounter() as c:
        out = sharded_fn(*sts)
    full = mp.unshard(out)
    (full * g).sum().backward()
    errs = [float((full - ref).detach().abs().max()) if full.numel() else 0.0]
    for x, s in zip(xs, sts):
        gs = mp.unshard(s.grad) if s.grad is not None else torch.zeros_like(x)
        errs.append(float((gs - x.grad).abs().max()) if x.grad is not None else float(gs.abs().max()))
    return errs, out.spec, c.total_bytes


def _same_layout(got: P, want: P, shape) -> bool:
    """Equal layouts, up to the split of size-1 dims (a size-1 dim split over size-1 axes holds the same
    block on every rank, so the result may be reported replicated there)."""
    return got.unreduced == want.unreduced and all(
        tuple(got.axes_of(d)) == tuple(want.axes_of(d)) or shape[d] == 1 for d in range(len(shape)))


def _assert_ok(results):
    for errs, *_ in results:
        assert max(errs) < 1e-9, errs


# ---------------------------------------------------------------- pointwise
BINARY = {"add": torch.add, "sub": lambda a, b: a - b, "mul": lambda a, b: a * b, "div": lambda a, b: a / (b.abs() + 1),
          "maximum": torch.maximum, "pow": lambda a, b: a.abs() ** b, "where": lambda a, b: torch.where(a > 0, a, b)}


def _binary_case(mesh, seed, name, spec_a, shape_a, spec_b, shape_b):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(shape_a, dtype=torch.float64, generator=gen)
    b = torch.randn(shape_b, dtype=torch.float64, generator=gen)
    return _compare(mesh, seed, BINARY[name], BINARY[name], [a, b], [spec_a, spec_b])


@given(mss=mesh_spec_shape(), name=st.sampled_from(sorted(BINARY)), data=st.data(), seed=st.integers(0, 99))
def test_binary_broadcast(pool, mss, name, data, seed):
    mshape, names, spec_a, shape_a = mss
    nb = data.draw(st.integers(1, len(shape_a)))
    shape_b, ents = [], []
    for d in range(len(shape_a) - nb, len(shape_a)):
        bcast = data.draw(st.booleans())
        keep = data.draw(st.booleans())
        shape_b.append(1 if bcast else shape_a[d])
        ents.append(spec_a.axes_of(d) if (keep and not bcast and spec_a.axes_of(d)) else None)
    spec_b = P(*ents)
    res = pool.run(_binary_case, mshape, names, seed, name, spec_a, tuple(shape_a), spec_b, tuple(shape_b))
    _assert_ok(res)
    for _, spec, fwd_bytes in res:
        assert _same_layout(spec, spec_a, shape_a)
        assert fwd_bytes == 0  # replicated -> sharded is a free slice


UNARY = {"exp": torch.exp, "tanh": torch.tanh, "gelu": F.gelu, "relu": F.relu, "silu": F.silu, "sigmoid": torch.sigmoid,
         "square": lambda x: x * x, "neg": lambda x: -x, "scale": lambda x: 3.0 * x + 1.0, "abs": torch.abs,
         "softplus": F.softplus}


def _unary_case(mesh, seed, name, spec, shape):
    a = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    return _compare(mesh, seed, UNARY[name], UNARY[name], [a], [spec])


@given(mss=mesh_spec_shape(), name=st.sampled_from(sorted(UNARY)), seed=st.integers(0, 99))
def test_unary(pool, mss, name, seed):
    mshape, names, spec, shape = mss
    res = pool.run(_unary_case, mshape, names, seed, name, spec, shape)
    _assert_ok(res)
    assert all(_same_layout(r[1], spec, shape) and r[2] == 0 for r in res)


# ---------------------------------------------------------------- reductions
def _reduce_fn(kind, dims, keepdim):
    if kind == "sum":
        return lambda x: x.sum(dim=dims, keepdim=keepdim)
    if kind == "mean":
        return lambda x: x.mean(dim=dims, keepdim=keepdim)
    if kind == "amax":
        return lambda x: x.amax(dim=dims, keepdim=keepdim)
    if kind == "amin":
        return lambda x: torch.amin(x, dim=dims, keepdim=keepdim)
    if kind == "max":
        return lambda x: x.max(dim=dims[0], keepdim=keepdim).values
    if kind == "argmax":
        return lambda x: x.max(dim=dims[0], keepdim=keepdim).indices.to(x.dtype) + 0 * x.sum()
    if kind == "norm":
        return lambda x: torch.linalg.vector_norm(x, dim=dims, keepdim=keepdim)
    if kind == "sum_all":
        return lambda x: x.sum()
    if kind == "sq_then_sum":
        return lambda x: (x.sum(dim=dims, keepdim=keepdim) ** 2)
    raise KeyError(kind)


def _reduce_case(mesh, seed, kind, dims, keepdim, spec, shape):
    a = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    fn = _reduce_fn(kind, dims, keepdim)
    return _compare(mesh, seed, fn, fn, [a], [spec])


@given(mss=mesh_spec_shape(), kind=st.sampled_from(["sum", "mean", "amax", "amin", "max", "argmax", "norm",
                                                      "sum_all", "sq_then_sum"]),
       data=st.data(), keepdim=st.booleans(), seed=st.integers(0, 99))
def test_reductions(pool, mss, kind, data, keepdim, seed):
    mshape, names, spec, shape = mss
    nd = len(shape)
    if kind in ("max", "argmax"):
        dims = (data.draw(st.integers(0, nd - 1)),)
    else:
        dims = tuple(sorted(data.draw(st.sets(st.integers(0, nd - 1), min_size=1))))
    res = pool.run(_reduce_case, mshape, names, seed, kind, dims, keepdim, spec, shape)
    _assert_ok(res)
    if kind in ("sum", "mean"):
        split = {a for d in dims for a in spec.axes_of(d)}
        assert set(res[0][1].unreduced) == split  # lazy: sums over split dims stay unreduced


# ---------------------------------------------------------------- views
def _view_case(mesh, seed, kind, spec, shape):
    a = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    nd = len(shape)
    fns = {
        "transpose": lambda x: x.transpose(0, -1),
        "permute": lambda x: x.permute(*reversed(range(nd))),
        "unsqueeze_squeeze": lambda x: x.unsqueeze(1).unsqueeze(0).squeeze(0) * 1.0,
        "flatten_major": lambda x: x.flatten(0, 1) if nd > 1 else x.flatten(),
        "split_minor": lambda x: x.reshape(*shape[:-1], shape[-1] // 1, 1),
        "mT": lambda x: x.mT if nd >= 2 else x,
        "T2": lambda x: x.T,
        "getitem": lambda x: x[..., None, :] * 2,
        "stack": lambda x: torch.stack([x, 2 * x], dim=0),
        "chunk_unsplit": lambda x: torch.cat(x.chunk(2, dim=_unsplit_dim(spec, nd)) if shape[_unsplit_dim(spec, nd)] % 2 == 0
                                             else (x,), dim=_unsplit_dim(spec, nd)),
        "expand": lambda x: x.unsqueeze(0).expand(3, *shape),
    }
    return _compare(mesh, seed, fns[kind], fns[kind], [a], [spec])


def _unsplit_dim(spec, nd):
    for d in range(nd):
        if not spec.axes_of(d):
            return d
    return None


@given(mss=mesh_spec_shape(), kind=st.sampled_from(["transpose", "permute", "unsqueeze_squeeze", "flatten_major",
                                                      "split_minor", "mT", "T2", "getitem", "stack", "chunk_unsplit",
                                                      "expand"]),
       seed=st.integers(0, 99))
def test_views(pool, mss, kind, seed):
    mshape, names, spec, shape = mss
    nd = len(shape)
    from hypothesis import assume
    if kind == "flatten_major" and nd > 1:
        assume(not spec.axes_of(1))
    if kind == "chunk_unsplit":
        assume(_unsplit_dim(spec, nd) is not None)
    _assert_ok(pool.run(_view_case, mshape, names, seed, kind, spec, shape))


# ---------------------------------------------------------------- contractions
def _matmul_case(mesh, seed, spec_a, shape_a, spec_b, shape_b, how):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(shape_a, dtype=torch.float64, generator=gen)
    b = torch.randn(shape_b, dtype=torch.float64, generator=gen)
    fns = {"matmul": lambda x, y: x @ y,
           "einsum": lambda x, y: torch.einsum("...k,kn->...n", x, y),
           "linear": lambda x, y: F.linear(x, y.t())}
    return _compare(mesh, seed, fns[how], fns[how], [a, b], [spec_a, spec_b])


@given(mesh=st.sampled_from(MESHES), data=st.data(), how=st.sampled_from(["matmul", "einsum", "linear"]),
       seed=st.integers(0, 99))
def test_local_contractions(pool, mesh, data, how, seed):
    """batch-split x replicated, 1D column (W split on out), 1D row (contraction split alike -> unreduced)."""
    mshape, names = mesh
    sizes = dict(zip(names, mshape))
    roles = {a: data.draw(st.sampled_from(["batch", "k", "n", "rep"])) for a in names}
    ax = {r: tuple(a for a in names if roles[a] == r) for r in ("batch", "k", "n")}
    n_of = {r: math.prod(sizes[a] for a in ax[r]) for r in ax}
    B = n_of["batch"] * data.draw(st.integers(1, 2))
    K = n_of["k"] * data.draw(st.integers(1, 3))
    N = n_of["n"] * data.draw(st.integers(1, 3))
    spec_a = P(ax["batch"] or None, None, ax["k"] or None)
    spec_b = P(ax["k"] or None, ax["n"] or None)
    res = pool.run(_matmul_case, mshape, names, seed, spec_a, (B, 3, K), spec_b, (K, N), how)
    _assert_ok(res)
    out_spec = res[0][1]
    assert out_spec.entries == P(ax["batch"] or None, None, ax["n"] or None).entries
    assert set(out_spec.unreduced) == set(ax["k"])


# ---------------------------------------------------------------- softmax / layer_norm
def _nn_case(mesh, seed, kind, spec, shape):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(shape, dtype=torch.float64, generator=gen)
    w = torch.randn(shape[-1], dtype=torch.float64, generator=gen)
    if kind == "softmax":
        return _compare(mesh, seed, lambda x: F.softmax(x, -1), lambda x: F.softmax(x, -1), [a], [spec])
    if kind == "log_softmax":
        return _compare(mesh, seed, lambda x: x.log_softmax(dim=-1), lambda x: x.log_softmax(dim=-1), [a], [spec])
    fn = lambda x, w_: F.layer_norm(x, (shape[-1],), w_, w_ * 0.5)
    return _compare(mesh, seed, fn, fn, [a, w], [spec, P()])


@given(mss=mesh_spec_shape(), kind=st.sampled_from(["softmax", "log_softmax", "layer_norm"]), seed=st.integers(0, 99))
def test_softmax_layernorm_unsplit_last_dim(pool, mss, kind, seed):
    mshape, names, spec, shape = mss
    nd = len(shape)
    spec = P(*[spec.axes_of(d) or None for d in range(nd - 1)])  # last dim whole
    _assert_ok(pool.run(_nn_case, mshape, names, seed, kind, spec, shape))
