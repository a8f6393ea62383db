"""The zigzag layout tag ``P(..., Zigzag("sp"), ...)``: spec semantics, shard/unshard/from_local/reshard
round trips with their communication volume, blockwise ops equal to dense, and clear errors (issued
before any collective) for ops that depend on the order along a zigzag dim."""
from __future__ import annotations

import pickle
import re

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import meshpar as mp
from meshpar import P, Zigzag
from meshpar.errors import ShardingError
from meshpar.mesh import CommCounter
from meshpar.sharding import zigzag as Z
from meshpar.sharding.reshard import Step, plan

ZS = Zigzag("sp")


# ----------------------------------------------------------------------------------------------- single process
def test_zigzag_spec_semantics():
    assert ZS == Zigzag("sp") and hash(ZS) == hash(Zigzag("sp")) and ZS.axis == "sp"
    assert ZS != "sp" and "sp" != ZS and P(None, ZS) != P(None, "sp")
    assert repr(P(None, ZS)) == "P(None, Zigzag('sp'))"
    assert pickle.loads(pickle.dumps(P(ZS, unreduced=["x"]))) == P(ZS, unreduced=["x"])
    s = P("data", ZS, None)
    assert [s.layout_of(d) for d in range(3)] == ["contiguous", "zigzag", "replicated"]
    assert s.contiguous() == P("data", "sp") and s.sharded_axes() == ("data", "sp")
    assert s.used_axes() == {"data", "sp"} and s.dim_of("sp") == 1
    assert P(unreduced=[ZS]).unreduced == ("sp",)  # unreduced axes are plain mesh axes
    with pytest.raises(ShardingError, match="splits its dimension alone"):
        P((ZS, "x"))
    with pytest.raises(TypeError):
        Zigzag(3)


def test_zigzag_index_math():
    for n in (1, 2, 3, 4):
        x = torch.arange(8 * n * 2)
        st_ = Z.to_storage(x, n, 0)
        assert torch.equal(Z.to_natural(st_, n, 0), x)
        blocks = st_.chunk(n)
        for r in range(n):
            assert torch.equal(blocks[r], Z.take_local(x, n, r, 0))
            assert torch.equal(Z.local_positions(x.numel(), n, r), x[Z.take_local(x, n, r, 0)])


def test_plan_treats_zigzag_as_its_own_axis():
    assert plan(P(ZS), P("sp"), 1) == [Step("all_gather", (ZS,), 0), Step("slice", ("sp",), 0)]
    assert plan(P("sp"), P(ZS), 1) == [Step("all_gather", ("sp",), 0), Step("slice", (ZS,), 0)]
    assert plan(P(ZS), P(), 1) == [Step("all_gather", (ZS,), 0)]
    assert plan(P(ZS), P(None, ZS), 2) == [Step("all_to_all", (ZS,), 1, 0)]
    assert plan(P(unreduced=["sp"]), P(ZS), 1) == [Step("reduce_scatter", (ZS,), 0)]


# ----------------------------------------------------------------------------------------------- round trips
def _expected_block(X, spec, mesh):
    """This rank's block, built by hand from torch.chunk (independent of meshpar's layout code)."""
    out = X
    for d in range(X.ndim):
        ax = spec.axes_of(d)
        if not ax:
            continue
        n, r = mesh.size(ax), mesh.axis_index(ax)
        if isinstance(ax[0], Zigzag):
            ch = out.chunk(2 * n, d)
            out = torch.cat([ch[r], ch[2 * n - 1 - r]], d)
        else:
            out = out.chunk(n, d)[r]
    return out


def _roundtrip(mesh, X, entries, W):
    spec = P(*entries)
    d = [i for i, e in enumerate(entries) if isinstance(e, Zigzag)][0]
    n = mesh.size("sp")
    res = {}
    with CommCounter() as c:
        x = mp.shard(X, spec, mesh)
    res["shard_calls"] = c.total_calls
    res["local_ok"] = torch.equal(x._local, _expected_block(X, spec, mesh))
    res["from_local_ok"] = torch.equal(mp.unshard(mp.from_local(x._local.clone(), spec, mesh)), X)
    b = x._local.numel() * x._local.element_size()
    vols = {}
    with CommCounter() as c:
        u = mp.unshard(x)
    vols["unshard"] = (c.calls.get(("sp",), 0), c.total_bytes)
    res["unshard_ok"] = torch.equal(u, X)
    with CommCounter() as c:
        xc = mp.reshard(x, spec.contiguous())
    vols["to_contiguous"] = (c.calls.get(("sp",), 0), c.bytes.get(("sp",), 0.0))
    res["contiguous_ok"] = torch.equal(xc._local, _expected_block(X, spec.contiguous(), mesh))
    with CommCounter() as c:
        xz = mp.reshard(xc, spec)
    vols["to_zigzag"] = (c.calls.get(("sp",), 0), c.bytes.get(("sp",), 0.0))
    res["back_ok"] = torch.equal(xz._local, x._local)
    with CommCounter() as c:
        xr = mp.reshard(mp.reshard(x, P()), spec)
    vols["replicated_roundtrip"] = (c.calls.get(("sp",), 0), c.total_bytes)
    res["replicated_ok"] = torch.equal(xr._local, x._local)
    # gradients through shard -> blockwise op -> reshard to contiguous -> unshard
    Xg = X.clone().requires_grad_(True)
    y = mp.unshard(mp.reshard(mp.shard(Xg, spec, mesh) * 3.0, spec.contiguous()))
    (y * W).sum().backward()
    res["grad_ok"] = torch.allclose(Xg.grad, 3.0 * W, rtol=0, atol=1e-12)
    res["b"], res["n"], res["vols"] = b, n, vols
    return res


@st.composite
def _zigzag_case(draw):
    sp = draw(st.sampled_from([2, 4, 8]))
    nd = draw(st.integers(1, 3))
    d = draw(st.integers(0, nd - 1))
    shape = [draw(st.integers(1, 3)) for _ in range(nd)]
    shape[d] = 2 * sp * draw(st.integers(1, 3))
    entries = [None] * nd
    entries[d] = ZS
    mesh = ((sp,), ("sp",))
    if sp <= 4 and nd > 1 and draw(st.booleans()):  # another dim split over a second axis
        e = draw(st.sampled_from([i for i in range(nd) if i != d]))
        shape[e] *= 2
        entries[e] = "x"
        mesh = ((sp, 2), ("sp", "x"))
    return mesh, tuple(shape), tuple(entries), draw(st.integers(0, 999))


@settings(max_examples=8)
@given(case=_zigzag_case())
def test_shard_unshard_from_local_reshard_roundtrips(pool, case):
    (mshape, mnames), shape, entries, seed = case
    g = torch.Generator().manual_seed(seed)
    X, W = (torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(2))
    for r in pool.run(_roundtrip, mshape, mnames, X, entries, W):
        for k in ("local_ok", "from_local_ok", "unshard_ok", "contiguous_ok", "back_ok", "replicated_ok", "grad_ok"):
            assert r[k], (k, entries)
        assert r["shard_calls"] == 0
        b, n = r["b"], r["n"]
        gather = (1, (n - 1) * b)  # zigzag <-> contiguous: one all-gather over "sp" of the local block
        to_global = (1, X.numel() * 8 - b)  # all-gathers to the global tensor: everything not held locally
        assert r["vols"] == dict(unshard=to_global, to_contiguous=gather, to_zigzag=gather,
                                 replicated_roundtrip=to_global)


def _move(mesh, X):
    x = mp.shard(X, P(ZS, None), mesh)
    with CommCounter() as c:
        y = mp.reshard(x, P(None, ZS))
    return torch.equal(mp.unshard(y), X), dict(c.by_kind), c.bytes[("sp",)], x._local.numel() * 8


def _reduce_into(mesh, X):
    part = mp.from_local(X / mesh.size("sp"), P(unreduced=["sp"]), mesh)  # partial sums of X
    with CommCounter() as c:
        y = mp.reshard(part, P(ZS, None))
    return torch.equal(y._local, mp.shard(X, P(ZS, None), mesh)._local), dict(c.by_kind)


def test_reshard_moves_zigzag_between_dims_with_one_all_to_all(pool):
    X = torch.randn(16, 8, dtype=torch.float64)
    for ok, kinds, nbytes, b in pool.run(_move, (4,), ("sp",), X):
        assert ok and kinds == {"all_to_all": 1} and nbytes == 3 / 4 * b
    X = torch.arange(16 * 8, dtype=torch.float64).view(16, 8)  # exact in float64 after /4 and the sum
    for ok, kinds in pool.run(_reduce_into, (4,), ("sp",), X):
        assert ok and kinds == {"reduce_scatter": 1}


def _bad_layout(mesh):
    msgs = []
    for fn in (lambda: mp.shard(torch.zeros(2, 12), P(None, ZS), mesh),
               lambda: mp.from_local(torch.zeros(2, 3), P(None, ZS), mesh),
               lambda: mp.shard(torch.zeros(8, 8), P(ZS, "sp"), mesh)):
        try:
            fn()
            msgs.append(None)
        except ShardingError as e:
            msgs.append(str(e))
    return msgs


def test_bad_zigzag_layouts(pool):
    m = pool.run(_bad_layout, (4,), ("sp",))[0]
    assert re.search(r"dim 1 has size 12.*zigzag.*'sp' \(4 ranks\).*2\*4 = 8.*pad dim 1 to a multiple of 8.*"
                     r"P\(None, 'sp'\)", m[0]), m[0]
    assert "dim 1 has size 12" in m[1]
    assert "used twice" in m[2]


# ----------------------------------------------------------------------------------------------- ops
def _mlp(x, lnw, lnb, w1, b1, w2):
    """Blockwise ops a transformer layer is made of: norm, linear, activation, softmax (hidden), residual."""
    h = F.layer_norm(x, (x.shape[-1],), lnw, lnb)
    h = F.gelu(F.linear(h, w1, b1))
    h = h.softmax(-1) * h
    return x + h @ w2


def _ops(mesh, X, params, seed):
    spec = P(None, ZS, None)
    out, grads = {}, {}
    xg = X.clone().requires_grad_(True)
    ps = [p.clone().requires_grad_(True) for p in params]
    x = mp.shard(xg, spec, mesh)
    sp = [mp.shard(p, P(), mesh) for p in ps]
    y = _mlp(x, *sp)
    assert y.spec == spec
    out["y"] = mp.unshard(y)
    out["sum_seq"] = mp.unshard(y.sum(1))          # reduction over the zigzag dim: order-free
    out["amax_seq"] = mp.unshard(y.amax(1))
    out["mean"] = mp.unshard(y.mean())
    out["merge"] = mp.unshard(y.reshape(X.shape[0], X.shape[1] // 2, 2 * X.shape[2]))  # zigzag major dim kept
    out["transpose"] = mp.unshard(y.transpose(0, 1))
    out["scores"] = mp.unshard(torch.einsum("bsc,btc->bst", y, mp.reshard(y, P())))
    out["contract_seq"] = mp.unshard(torch.einsum("bsc,bsd->bcd", y, x))  # contraction over the zigzag dim
    out["dropout"] = mp.unshard(mp.ops.dropout.dropout(y, 0.3, seed=seed))
    hz = mp.reshard(mp.reshard(y, P()).reshape(X.shape[0] * X.shape[1], X.shape[2]), P(None, ZS))  # zigzag hidden
    out["norm_hidden"] = mp.unshard(F.layer_norm(hz, (X.shape[2],), mp.shard(ps[0], P(ZS), mesh)))
    loss = (out["y"] ** 2).sum() + out["contract_seq"].sum() + out["sum_seq"].sum()
    loss.backward()
    grads = [xg.grad] + [p.grad for p in ps]
    return {k: v.detach() for k, v in out.items()}, grads


def _dense_ops(X, params, seed):
    from meshpar.ops.dropout import dropout
    xg = X.clone().requires_grad_(True)
    ps = [p.clone().requires_grad_(True) for p in params]
    y = _mlp(xg, *ps)
    out = dict(y=y, sum_seq=y.sum(1), amax_seq=y.amax(1), mean=y.mean(),
               merge=y.reshape(X.shape[0], X.shape[1] // 2, 2 * X.shape[2]), transpose=y.transpose(0, 1),
               scores=torch.einsum("bsc,btc->bst", y, y), contract_seq=torch.einsum("bsc,bsd->bcd", y, xg),
               dropout=dropout(y, 0.3, seed=seed),
               norm_hidden=F.layer_norm(y.reshape(-1, X.shape[2]), (X.shape[2],), ps[0]))
    loss = (out["y"] ** 2).sum() + out["contract_seq"].sum() + out["sum_seq"].sum()
    loss.backward()
    return {k: v.detach() for k, v in out.items()}, [xg.grad] + [p.grad for p in ps]


def test_blockwise_ops_on_zigzag_equal_dense(pool):
    g = torch.Generator().manual_seed(0)
    B, S, C = 2, 16, 8
    X = torch.randn(B, S, C, generator=g, dtype=torch.float64)
    params = [torch.randn(s, generator=g, dtype=torch.float64) * 0.5
              for s in ((C,), (C,), (2 * C, C), (2 * C,), (2 * C, C))]
    ref, ref_g = _dense_ops(X, params, 5)
    for out, grads in pool.run(_ops, (4,), ("sp",), X, params, 5):
        for k, r in ref.items():
            assert out[k].shape == r.shape and (out[k] - r).abs().max() < 1e-10, k
        for i, (a, r) in enumerate(zip(grads, ref_g)):
            assert (a - r).abs().max() < 1e-10, i


def _refusals(mesh):
    X = torch.arange(2 * 16 * 4, dtype=torch.float64).view(2, 16, 4)
    x = mp.shard(X, P(None, ZS, None), mesh)
    xc = mp.shard(X, P(None, "sp", None), mesh)
    calls = {
        "mix_add": lambda: x + xc,
        "mix_matmul": lambda: torch.einsum("bsc,bsd->bcd", x, xc),
        "slice": lambda: x[:, :4],
        "index": lambda: x[:, 3],
        "cat": lambda: torch.cat([x, x], 1),
        "split": lambda: x.split(4, 1),
        "cumsum": lambda: torch.cumsum(x, 1),
        "argmax": lambda: x.max(1),
        "reshape_bad": lambda: x.reshape(2, 4, 16),
        "softmax_seq": lambda: x.softmax(1),
    }
    out = {}
    for name, fn in calls.items():
        # by default these reshard implicitly (exactly); strict mode refuses before any collective
        with CommCounter() as c, mp.strict():
            try:
                fn()
                out[name] = (None, c.total_calls)
            except ShardingError as e:
                out[name] = (str(e), c.total_calls)
    return out


REFUSALS = {
    "mix_add": r"\(Zigzag\('sp'\),\) vs \('sp',\).*reshard",
    "mix_matmul": r"reshard",
    "slice": r"slicing along dim 1.*reshard",
    "index": r"integer indexing along dim 1.*reshard",
    "cat": r"cat along dim 1.*reshard",
    "split": r"split along dim 1.*reshard",
    "cumsum": r"cumsum.*reshard",
    "argmax": r"zigzag layout; reshard it to contiguous first: meshpar.reshard\(x, P\(None, 'sp'\)\)",
    "reshape_bad": r"8 zigzag chunks.*reshard",
    "softmax_seq": r"softmax across dim 1.*reshard",
}


def test_order_sensitive_ops_refuse_before_communication(pool):
    for out in pool.run(_refusals, (4,), ("sp",)):
        for name, pattern in REFUSALS.items():
            msg, calls = out[name]
            assert msg is not None and re.search(pattern, msg), (name, msg)
            assert calls == 0, name
