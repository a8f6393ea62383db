"""Exact semantics of ordinary PyTorch on ShardedTensors (issue 12): partial sums mixed with Python
scalars, plain tensors and replicated tensors, in-place variants, casts, cat/stack, the long tail of
ops, index assignment. Every case compares the sharded result against the dense op in float64,
forward and input gradients, on 2 and 4 gloo ranks; a case may instead refuse with a ShardingError
(never a wrong number)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import meshpar as mp
from meshpar import P

TOL = 1e-9

# plain tensors captured by the cases (identical on every rank: fixed generator)
_G = torch.Generator().manual_seed(1234)
C84 = torch.randn(8, 4, dtype=torch.float64, generator=_G)
C4 = torch.randn(4, dtype=torch.float64, generator=_G)


def _mm_partial(a, b):
    """a[8,6] @ b[6,4] with the contraction dim split: the result is a partial sum (unreduced)."""
    return a @ b


# name -> (fn(a, b), spec_a, spec_b, differentiable). a: (8, 6), b: (6, 4). "X" / "Y" are mesh axes.
CASES = {
    # partial sum (unreduced over x) mixed with values
    "partial_plus_scalar": (lambda a, b: _mm_partial(a, b) + 1, P(None, "x"), P("x"), True),
    "scalar_minus_partial": (lambda a, b: 1 - _mm_partial(a, b), P(None, "x"), P("x"), True),
    "partial_add_method": (lambda a, b: _mm_partial(a, b).add(1), P(None, "x"), P("x"), True),
    "partial_sub_method": (lambda a, b: _mm_partial(a, b).sub(2.5, alpha=2), P(None, "x"), P("x"), True),
    "partial_plus_plain": (lambda a, b: _mm_partial(a, b) + C84, P(None, "x"), P("x"), True),
    "plain_plus_partial": (lambda a, b: C4 + _mm_partial(a, b), P(None, "x"), P("x"), True),
    "partial_plus_repl": (lambda a, b: _mm_partial(a, b) + (b[0] * 0 + C4), P(None, "x"), P("x"), True),
    "sum_plus_one": (lambda a, b: a.sum() + 1, P("x"), P(), True),
    "mean_minus_half": (lambda a, b: a.mean() - 0.5, P("x", "y"), P(), True),
    "sum_dim_plus_plain": (lambda a, b: a.sum(0) + C84[0, :1], P("x"), P(), True),
    "partial_times_split_same_axis": (lambda a, b: a.sum(1, keepdim=True) * b.sum(1)[:1].reshape(1, 1) * a,
                                      P(None, "x"), P("x"), True),
    "partial_times_split": (lambda a, b: a.sum(1, keepdim=True) * a, P("y", "x"), P(), True),
    "partial_mul_partial": (lambda a, b: a.sum(0) * a.sum(0), P("x"), P(), True),
    "partial_div_scalar": (lambda a, b: _mm_partial(a, b) / 3 * 2, P(None, "x"), P("x"), True),
    "partial_rdiv": (lambda a, b: 1 / (_mm_partial(a, b) ** 2 + 1), P(None, "x"), P("x"), True),
    "partial_int_cast": (lambda a, b: (_mm_partial(a, b) * 10).to(torch.int32).to(torch.float64) + 0 * a.sum(),
                         P(None, "x"), P("x"), False),
    "partial_long": (lambda a, b: (_mm_partial(a, b) * 10).long().double(), P(None, "x"), P("x"), False),
    "partial_bool": (lambda a, b: (_mm_partial(a, b)).bool().double(), P(None, "x"), P("x"), False),
    "cat_partial_plain": (lambda a, b: torch.cat([_mm_partial(a, b), C84], 0), P(None, "x"), P("x"), True),
    "stack_partial_plain": (lambda a, b: torch.stack([_mm_partial(a, b), C84]), P(None, "x"), P("x"), True),
    "cat_partial_partial": (lambda a, b: torch.cat([_mm_partial(a, b), _mm_partial(a, b) * 2], 1),
                            P(None, "x"), P("x"), True),
    "where_partial": (lambda a, b: torch.where(C84 > 0, _mm_partial(a, b), 0.5), P(None, "x"), P("x"), True),
    "partial_relu": (lambda a, b: F.relu(_mm_partial(a, b)), P(None, "x"), P("x"), True),
    "partial_exp": (lambda a, b: _mm_partial(a, b).exp(), P(None, "x"), P("x"), True),
    "partial_clamp": (lambda a, b: _mm_partial(a, b).clamp(min=0.1), P(None, "x"), P("x"), True),
    "partial_float": (lambda a, b: _mm_partial(a, b).to(torch.float64) * 1.0, P(None, "x"), P("x"), True),
    "partial_neg_sum": (lambda a, b: (-_mm_partial(a, b)).sum(), P(None, "x"), P("x"), True),
    "partial_T_plus": (lambda a, b: _mm_partial(a, b).T + 1, P(None, "x"), P("x"), True),
    "partial_getitem_plus": (lambda a, b: _mm_partial(a, b)[1:3] + 1, P(None, "x"), P("x"), True),
    "partial_mse": (lambda a, b: F.mse_loss(_mm_partial(a, b), C84), P(None, "x"), P("x"), True),
    "partial_2x2_sum_plus": (lambda a, b: a.sum() + a.sum() + 1, P("x", "y"), P(), True),
    # long tail on split / replicated operands
    "cumsum_split": (lambda a, b: a.cumsum(0), P("x"), P(), True),
    "cumsum_unsplit": (lambda a, b: torch.cumsum(a, 1), P("x"), P(), True),
    "topk": (lambda a, b: a.topk(3, dim=1).values, P("x", "y"), P(), True),
    "sort": (lambda a, b: a.sort(dim=0).values, P("x"), P(), True),
    "tril": (lambda a, b: a.tril(), P("x", "y"), P(), True),
    "triu": (lambda a, b: torch.triu(a, 1), P("x"), P(), True),
    "flip": (lambda a, b: a.flip(0), P("x"), P(), True),
    "roll": (lambda a, b: a.roll(1, 0), P("x"), P(), True),
    "gather": (lambda a, b: a.gather(1, torch.tensor([[0, 2]] * 8)), P("x"), P(), True),
    "index_select": (lambda a, b: a.index_select(1, torch.tensor([5, 0, 3])), P("x", "y"), P(), True),
    "narrow": (lambda a, b: a.narrow(0, 1, 4), P("x"), P(), True),
    "pad": (lambda a, b: F.pad(a, (1, 2)), P("x", "y"), P(), True),
    "mse": (lambda a, b: F.mse_loss(a, C84[:, :1].expand(8, 6).contiguous()), P("x"), P(), True),
    "var": (lambda a, b: a.var(0), P("x"), P(), True),
    "std": (lambda a, b: a.std(), P("x", "y"), P(), True),
    "argmax": (lambda a, b: a.argmax(1).double() + 0 * a.sum(), P("x", "y"), P(), True),
    "all_any": (lambda a, b: (a > -5).all().double() + (a > 1).any().double() + 0 * a.sum(), P("x"), P(), True),
    "nonzero": (lambda a, b: (a > 0).nonzero().double().sum() + 0 * a.sum(), P("x"), P(), True),
    "bool_index": (lambda a, b: a[a > 0], P("x"), P(), True),
    "outer": (lambda a, b: torch.outer(a[:, 0], b[0]), P("x"), P(None, "x"), True),
    "cat_split_dim": (lambda a, b: torch.cat([a, a * 2], 0), P("x"), P(), True),
    "cat_with_plain": (lambda a, b: torch.cat([a, C84[:, :2].repeat(1, 3)], 0), P("x"), P(), True),
    "a_at_aT": (lambda a, b: a @ a.T, P("x", "y"), P(), True),
    "repl_next_to_split": (lambda a, b: a + b[:, 0], P("x", "y"), P(), True),
    "softmax_split": (lambda a, b: a.softmax(1), P("x", "y"), P(), True),
    "log_softmax_split": (lambda a, b: F.log_softmax(a, 0), P("x"), P(), True),
    "zigzag_cumsum": (lambda a, b: a.cumsum(0), P(mp.Zigzag("x")), P(), True),
    "zigzag_plus_contiguous": (lambda a, b: a + (mp.reshard(a * 1.0, P("x")) if isinstance(a, mp.ShardedTensor) else a) * 2, P(mp.Zigzag("x")), P(), True),
    "zigzag_partial_plus_one": (lambda a, b: a.sum(0) + 1, P(mp.Zigzag("x")), P(), True),
    "cross_entropy_plain": (lambda a, b: F.cross_entropy(a, torch.arange(8) % 6), P("x"), P(), True),
}


def _run_case(mesh, name, world_names):
    fn, sa, sb, diff = CASES[name]
    # map the spec's axes onto this mesh (on a 1-d mesh drop "y")
    def fit(spec):
        ents = []
        for e in spec.entries:
            ax = (e,) if isinstance(e, str) else (e or ())
            ax = tuple(a for a in ax if str.__str__(a) in mesh.names)
            ents.append(ax or None)
        return P(*ents)
    sa, sb = fit(sa), fit(sb)
    g = torch.Generator().manual_seed(7)
    a = torch.randn(8, 6, dtype=torch.float64, generator=g)
    b = torch.randn(6, 4, dtype=torch.float64, generator=g)
    xs = [a.clone().requires_grad_(diff), b.clone().requires_grad_(diff)]
    ref = fn(*xs)
    sts = [mp.shard(a.clone(), sa, mesh).requires_grad_(diff), mp.shard(b.clone(), sb, mesh).requires_grad_(diff)]
    try:
        out = fn(*sts)
    except mp.ShardingError as e:
        return ("refuse", str(e))
    full = mp.unshard(out) if isinstance(out, mp.ShardedTensor) else out
    if tuple(full.shape) != tuple(ref.shape):
        return ("wrong", f"shape {tuple(full.shape)} vs {tuple(ref.shape)}")
    err = float((full.detach().double() - ref.detach().double()).abs().max()) if ref.numel() else 0.0
    if err > TOL:
        return ("wrong", f"forward err {err}")
    if diff and ref.requires_grad:
        cot = torch.randn(ref.shape, dtype=ref.dtype, generator=torch.Generator().manual_seed(3))
        (ref * cot).sum().backward()
        (full * cot).sum().backward()
        for x, s in zip(xs, sts):
            gs = mp.unshard(s.grad) if s.grad is not None else torch.zeros_like(x)
            gx = x.grad if x.grad is not None else torch.zeros_like(x)
            e = float((gs - gx).abs().max())
            if e > TOL:
                return ("wrong", f"grad err {e}")
    return ("pass", "")


def _run_all(mesh, names):
    out = {}
    for n in names:
        try:
            out[n] = _run_case(mesh, n, mesh.names)
        except Exception as e:  # noqa: BLE001 - anything but a ShardingError is a defect
            out[n] = ("error", f"{type(e).__name__}: {e}")
    return out


MUST_PASS = set(CASES)  # every case is exact now


@pytest.mark.parametrize("mesh_shape,names", [((2,), ("x",)), ((2, 2), ("x", "y"))])
def test_semantics_cases(pool, mesh_shape, names):
    res = pool.run(_run_all, mesh_shape, names, sorted(CASES))
    bad = {}
    for r in res:
        for n, (status, msg) in r.items():
            if status != "pass" and n in MUST_PASS:
                bad[n] = (status, msg[:300])
    assert not bad, "\n".join(f"{k}: {v}" for k, v in sorted(bad.items()))
