"""Property tests that search where sharding bugs live: every spec kind (split, tuple axes, Zigzag,
replicated, partial sums) against every operand kind (ShardedTensor, replicated, plain tensor,
Python scalar), out-of-place and in place, for pointwise ops, reductions, views, cat/stack and
matmul. Each example runs once on the worker pool and compares with the dense float64 run, values
and gradients (:func:`meshpar.testing.assert_sharded_equal`). A refusal (ShardingError) is an
acceptable answer; a wrong number or a crash fails.
"""
from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st

import meshpar as mp
from meshpar import P, Zigzag
from meshpar.sharding import take_block
from meshpar.testing import Sharded, assert_sharded_equal, compare_sharded, partial_shares, splittable
from meshpar.testing import strategies as mst

WORLD = int(os.environ.get("MESHPAR_TEST_WORLD", "8"))
MAX_RANKS = min(WORLD, 4)  # 8-rank meshes cost 2x on a 2-core CI machine; 2x2 already has tuple axes


def _run(mesh, table: str, name: str, operands: tuple, inplace: bool = False):
    fn = TABLES[table][name]
    out = assert_sharded_equal(fn, *operands, mesh=mesh, inplace=inplace, allow_refusal=True)
    return out.status, out.detail


def _statuses(res):
    return {s for s, _ in res}


# ----------------------------------------------------------------------------- pointwise, binary
BINARY = {
    "add": lambda a, b: a + b,
    "radd": lambda a, b: b + a,
    "sub": lambda a, b: a - b,
    "rsub": lambda a, b: b - a,
    "mul": lambda a, b: a * b,
    "div": lambda a, b: a / b,
    "rdiv": lambda a, b: b / (a * a + 1),
    "pow": lambda a, b: (a * a + 1) ** b,
    "maximum": lambda a, b: torch.maximum(a, torch.as_tensor(b, dtype=torch.float64)),
    "where": lambda a, b: torch.where(a > 0, a, b),
    "add_alpha": lambda a, b: torch.add(a, b, alpha=2),
    "lerp": lambda a, b: torch.lerp(a, torch.as_tensor(b, dtype=torch.float64).expand_as(a), 0.25),
}
INPLACE = {
    "add_": lambda a, b: a.add_(b),
    "sub_": lambda a, b: a.sub_(b),
    "mul_": lambda a, b: a.mul_(b),
    "div_": lambda a, b: a.div_(b),
    "iadd": lambda a, b: a.__iadd__(b),
    "copy_": lambda a, b: a.copy_(torch.as_tensor(b, dtype=torch.float64).expand_as(a)),
    "clamp_min_": lambda a, b: a.clamp_(min=0.25),
    "add_then_relu": lambda a, b: a.add_(b).relu_(),
}


@given(case=mst.binary_operands(max_ranks=MAX_RANKS, positive_b=True), name=st.sampled_from(sorted(BINARY)))
def test_pointwise_binary(pool, case, name):
    res = pool.run(_run, case.mesh_shape, case.names, "binary", name, case.operands)
    assert _statuses(res) <= {"pass", "refuse"}, res


@given(case=mst.binary_operands(max_ranks=MAX_RANKS, positive_b=True), name=st.sampled_from(sorted(INPLACE)))
def test_pointwise_inplace(pool, case, name):
    res = pool.run(_run, case.mesh_shape, case.names, "inplace", name, case.operands, True)
    assert _statuses(res) <= {"pass", "refuse"}, res


# ----------------------------------------------------------------------------- pointwise, unary
UNARY = {
    "exp": torch.exp, "tanh": torch.tanh, "relu": F.relu, "gelu": F.gelu, "abs": torch.abs, "neg": lambda a: -a,
    "square": lambda a: a * a, "affine": lambda a: 3.0 * a + 1.0, "one_minus": lambda a: 1 - a,
    "sigmoid": torch.sigmoid, "clamp": lambda a: a.clamp(-0.5, 0.5),
    "to_int": lambda a: (a * 4).to(torch.int32), "gt0": lambda a: a > 0,
    "exp_": lambda a: a.exp_(), "mul_scalar_": lambda a: a.mul_(2.5), "add_scalar_": lambda a: a.add_(1),
    "zero_": lambda a: a.zero_(), "fill_": lambda a: a.fill_(0.5),
}
_UNARY_INPLACE = {n for n in UNARY if n.endswith("_")}


@given(case=mst.unary_operand(max_ranks=MAX_RANKS), name=st.sampled_from(sorted(UNARY)))
def test_pointwise_unary(pool, case, name):
    res = pool.run(_run, case.mesh_shape, case.names, "unary", name, case.operands, name in _UNARY_INPLACE)
    assert _statuses(res) <= {"pass", "refuse"}, res


# ----------------------------------------------------------------------------- reductions
REDUCE = {
    "sum": lambda a: a.sum(), "sum_plus_1": lambda a: a.sum() + 1, "mean_minus": lambda a: a.mean() - 0.5,
    "sum0": lambda a: a.sum(0), "sum_last_keep": lambda a: a.sum(-1, keepdim=True),
    "mean0": lambda a: a.mean(0), "amax0": lambda a: a.amax(0), "max_all": lambda a: a.max(),
    "norm": lambda a: torch.linalg.vector_norm(a), "var0": lambda a: a.var(0) if a.shape[0] > 1 else a.sum(0),
    "std_all": lambda a: a.std() if a.numel() > 1 else a.sum(), "argmax0": lambda a: a.argmax(0),
    "softmax_last": lambda a: torch.softmax(a, -1), "logsumexp0": lambda a: torch.logsumexp(a, 0),
    "sum_sq": lambda a: (a.sum(0) ** 2).sum(), "cumsum_last": lambda a: a.cumsum(-1),
}


@given(case=mst.unary_operand(max_ranks=MAX_RANKS), name=st.sampled_from(sorted(REDUCE)))
def test_reductions(pool, case, name):
    res = pool.run(_run, case.mesh_shape, case.names, "reduce", name, case.operands)
    assert _statuses(res) <= {"pass", "refuse"}, res


# ----------------------------------------------------------------------------- views
VIEWS = {
    "transpose": lambda a: a.transpose(0, -1), "T2": lambda a: a.mT if a.ndim >= 2 else a,
    "unsqueeze": lambda a: a.unsqueeze(0), "flatten": lambda a: a.flatten(), "reshape": lambda a: a.reshape(-1, 1),
    "permute": lambda a: a.permute(*reversed(range(a.ndim))), "slice": lambda a: a[1:],
    "narrow_last": lambda a: a.narrow(-1, 0, 1), "select0": lambda a: a[0], "expand": lambda a: a.unsqueeze(0).expand(2, *a.shape),
    "flip0": lambda a: a.flip(0), "chunk0": lambda a: a.chunk(2, 0)[0], "view_plus_1": lambda a: a.view(-1) + 1,
}


@given(case=mst.unary_operand(max_ranks=MAX_RANKS), name=st.sampled_from(sorted(VIEWS)))
def test_views(pool, case, name):
    res = pool.run(_run, case.mesh_shape, case.names, "views", name, case.operands)
    assert _statuses(res) <= {"pass", "refuse"}, res


# ----------------------------------------------------------------------------- cat / stack
CATS = {
    "cat0": lambda a, b: torch.cat([a, torch.as_tensor(b, dtype=torch.float64).expand_as(a)], 0),
    "cat_last": lambda a, b: torch.cat([torch.as_tensor(b, dtype=torch.float64).expand_as(a), a], -1),
    "stack0": lambda a, b: torch.stack([a, torch.as_tensor(b, dtype=torch.float64).expand_as(a)]),
    "stack_last": lambda a, b: torch.stack([a, torch.as_tensor(b, dtype=torch.float64).expand_as(a)], -1),
}


@given(case=mst.binary_operands(max_ranks=MAX_RANKS, other_kinds=("sharded", "replicated", "plain")),
       name=st.sampled_from(sorted(CATS)))
def test_cat_stack(pool, case, name):
    res = pool.run(_run, case.mesh_shape, case.names, "cats", name, case.operands)
    assert _statuses(res) <= {"pass", "refuse"}, res


# ----------------------------------------------------------------------------- matmul
MATMUL = {"matmul": lambda a, b: a @ b, "matmul_plus_1": lambda a, b: a @ b + 1,
          "linear": lambda a, b: F.linear(a, b.T), "scaled": lambda a, b: 1 - 2 * (a @ b)}


@st.composite
def matmul_operands(draw):
    mshape, names = draw(mst.meshes(MAX_RANKS))
    sizes = dict(zip(names, mshape))
    base = sorted({2 * s for s in mshape} | {s for s in mshape})
    m, k, n = (draw(st.sampled_from(base)) for _ in range(3))
    _, a = draw(mst.operand(names, sizes, (m, k), kinds=("sharded",)))
    kb, b = draw(mst.operand(names, sizes, (k, n), kinds=("sharded", "replicated", "plain")))
    return mst.Case(tuple(mshape), tuple(names), (a, b), ("sharded", kb))


@given(case=matmul_operands(), name=st.sampled_from(sorted(MATMUL)))
def test_matmul(pool, case, name):
    res = pool.run(_run, case.mesh_shape, case.names, "matmul", name, case.operands)
    assert _statuses(res) <= {"pass", "refuse"}, res


TABLES = {"binary": BINARY, "inplace": INPLACE, "unary": UNARY, "reduce": REDUCE, "views": VIEWS, "cats": CATS,
          "matmul": MATMUL}


# ----------------------------------------------------------------------------- the harness itself
def _wrong_fn(a):
    """Deliberately wrong when sharded: adds the rank's index to every block (dense: identity)."""
    return mp.from_local(a.local + a.mesh.rank, a.spec, a.mesh) if isinstance(a, mp.ShardedTensor) else a * 1


def _crash_fn(a):
    if isinstance(a, mp.ShardedTensor):
        raise AttributeError("not a meshpar refusal")
    return a


def _refuse_fn(a):
    if isinstance(a, mp.ShardedTensor):
        raise mp.ShardingError("refused")
    return a


def _harness_case(mesh):
    X = torch.randn(4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    out = {name: compare_sharded(fn, (Sharded(X, P("x")),), mesh=mesh).status
           for name, fn in (("wrong", _wrong_fn), ("crash", _crash_fn), ("refuse", _refuse_fn),
                            ("pass", torch.tanh))}
    # a grad-only bug: right values, gradient of the first operand scaled on one rank
    class _Bad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            return g * (1 + mesh.rank)
    out["wrong_grad"] = compare_sharded(lambda a: mp.from_local(_Bad.apply(a.local), a.spec, a.mesh)
                                        if isinstance(a, mp.ShardedTensor) else a * 1,
                                        (Sharded(X, P("x")),), mesh=mesh).status
    spec = P(None, "y", unreduced=("x",))
    blk = partial_shares(X, spec, mesh, seed=3)
    total = mp.unshard(mp.from_local(blk, spec, mesh, shape=X.shape))
    out["shares_exact"] = bool(torch.equal(total, splittable(X)))
    out["shares_differ"] = not torch.equal(blk, take_block(X, P(None, "y"), mesh))
    try:
        assert_sharded_equal(_wrong_fn, Sharded(X, P("x")), mesh=mesh)
        out["assert_raises"] = False
    except AssertionError as e:
        out["assert_raises"] = "wrong" in str(e)
    return out


def test_harness_tells_pass_refuse_wrong_crash(pool):
    for got in pool.run(_harness_case, (2, 2), ("x", "y")):
        assert got == {"wrong": "wrong", "crash": "crash", "refuse": "refuse", "pass": "pass", "wrong_grad": "wrong",
                       "shares_exact": True, "shares_differ": True, "assert_raises": True}


def test_strategies_draw_every_kind():
    """The strategies reach every spec kind and operand kind (so the properties above search them)."""
    from hypothesis import find, settings
    names, sizes, shape = ("x", "y"), {"x": 2, "y": 2}, (4, 8)
    preds = {"zigzag": lambda s: any(isinstance(e, Zigzag) for e in s),
             "tuple": lambda s: any(isinstance(e, tuple) for e in s),
             "partial": lambda s: bool(s.unreduced), "replicated": lambda s: s == P(),
             "split": lambda s: any(type(e) is str for e in s)}
    quick = settings(max_examples=300, database=None)
    for kind, pred in preds.items():
        find(mst.specs(names, sizes, shape), pred, settings=quick)
    for kind in mst.OPERAND_KINDS:
        find(mst.operand(names, sizes, shape), lambda o, k=kind: o[0] == k, settings=quick)
    assert set(preds) == set(mst.SPEC_KINDS)
