"""The no-grad fast path (memoised executors keyed by op, interned layouts and argument values).

Each case runs twice under ``torch.no_grad()``: the first call plans through the rules and
remembers an executor, the second must come from the memo (no rule runs) and agree with the
first call, with grad-mode dispatch (no memo) and with the dense op: same values, spec, global
shape, dtype and ``requires_grad``. Cases that differ only in what the key must tell apart
(scalar types, keyword arguments, meshes with equal names but other sizes, unreduced inputs)
run side by side.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import meshpar as mp
from meshpar import P
from meshpar.sharding import tensor as _tensor
from meshpar.sharding.dispatch import FAST


class _CountRules:
    """Counts calls that reach the rule dispatcher (i.e. missed the memo)."""

    def __enter__(self):
        self.n = 0
        self._orig = _tensor._HANDLER[0]

        def counting(func, args, kwargs):
            self.n += 1
            return self._orig(func, args, kwargs)
        _tensor._HANDLER[0] = counting
        return self

    def __exit__(self, *exc):
        _tensor._HANDLER[0] = self._orig


def _layout(t):
    if isinstance(t, mp.ShardedTensor):
        return ("S", t.spec, tuple(t.shape), tuple(t._local.shape), t.dtype)
    return ("T", tuple(t.shape), t.dtype)


def _dense(x):
    return mp.unshard(x).detach() if isinstance(x, mp.ShardedTensor) else x


def _check(name, f, inputs, memo: bool, out: list) -> None:
    """``f(*inputs)`` in grad mode (rules only) and twice without grad (rules, then the memo)."""
    ref = f(*[_dense(x) for x in inputs])
    slow = f(*inputs)
    with torch.no_grad():
        first = f(*inputs)
        with _CountRules() as c:
            second = f(*inputs)
    problems = []
    for label, got in (("first", first), ("second", second)):
        if _layout(got) != _layout(slow):
            problems.append(f"{label}: layout {_layout(got)} vs grad mode {_layout(slow)}")
        if got.requires_grad:
            problems.append(f"{label}: requires_grad under no_grad")
        d = _dense(got)
        if d.dtype != ref.dtype or d.shape != ref.shape or not torch.allclose(d, ref, rtol=1e-12, atol=1e-12):
            problems.append(f"{label}: differs from the dense op ({d.dtype} {tuple(d.shape)} vs "
                            f"{ref.dtype} {tuple(ref.shape)})")
    loc = lambda t: t._local if isinstance(t, mp.ShardedTensor) else t  # noqa: E731
    if not torch.equal(loc(first), loc(second)):
        problems.append("second call's block differs from the first's")
    if memo and c.n:
        problems.append(f"second call reached the rules {c.n} time(s): memo missed")
    if problems:
        out.append(f"{name}: " + "; ".join(problems))


def _fast_cases(mesh, seed):
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, dtype=torch.float64, generator=gen)  # noqa: E731
    X, Y, W, Wl, Bv = rnd(4, 6), rnd(4, 6), rnd(6, 5), rnd(5, 6), rnd(5)
    x = mp.shard(X, P("x", "y"), mesh)
    x0 = mp.shard(X, P("x"), mesh)
    x1 = mp.shard(X, P(None, "y"), mesh)
    y_rep = mp.shard(Y, P(), mesh)
    w_rep = mp.shard(W, P(), mesh)
    w_row = mp.shard(W, P("y"), mesh)
    wl, bl = mp.shard(Wl, P(), mesh), mp.shard(Bv, P(), mesh)
    xi = mp.shard(torch.arange(24).reshape(4, 6), P("x"), mesh)
    xg = mp.shard(X, P("x"), mesh).requires_grad_()
    # an unreduced (partial-sum) input: every rank holds X / (number of x ranks)
    u = mp.from_local(X[: X.shape[0]] / mesh.size("x"), P(unreduced=("x",)), mesh)
    out: list[str] = []
    cases = [
        ("add", lambda a: a + a, [x], True),
        ("add_replicated_sliced", lambda a, b: a + b, [x0, y_rep], True),
        ("sub_rev_scalar", lambda a: 1.5 - a, [x], True),
        ("mul_int", lambda a: a * 2, [xi], True),
        ("mul_float", lambda a: a * 2.0, [xi], True),
        ("mul_bool", lambda a: a * True, [xi], True),
        ("div_int", lambda a: a / 2, [xi], True),
        ("neg_zero", lambda a: a * -0.0, [x], True),
        ("pos_zero", lambda a: a * 0.0, [x], True),
        ("relu", torch.relu, [x], True),
        ("gelu", F.gelu, [x], True),
        ("gelu_tanh", lambda a: F.gelu(a, approximate="tanh"), [x], False),
        ("exp", torch.exp, [x0], True),
        ("to_float32", lambda a: a.to(torch.float32), [x], True),
        ("float", lambda a: a.float(), [x], True),
        ("transpose", lambda a: a.transpose(0, 1), [x], True),
        ("transpose_neg", lambda a: a.transpose(-1, -2), [x0], True),
        ("t", lambda a: a.t(), [x1], True),
        ("permute_list", lambda a: a.permute([1, 0]), [x], True),
        ("permute_args", lambda a: a.permute(1, 0), [x0], True),
        ("reshape", lambda a: a.reshape(-1, 3), [x0], True),
        ("reshape_tuple", lambda a: a.reshape((2, 2, 6)), [x0], True),
        ("view", lambda a: a.view(4, 2, 3), [x0], True),
        ("sum_kw", lambda a: a.sum(dim=1), [x0], True),
        ("sum_pos", lambda a: a.sum(1), [x0], True),
        ("sum_split", lambda a: a.sum(dim=0), [x0], True),
        ("sum_keepdim", lambda a: a.sum(dim=0, keepdim=True), [x], True),
        ("sum_all", lambda a: a.sum(), [x], True),
        ("sum_tuple", lambda a: a.sum(dim=(0, 1)), [x], True),
        ("mean_split", lambda a: a.mean(dim=0), [x0], True),
        ("mean_unsplit", lambda a: a.mean(dim=1), [x0], True),
        ("mean_split_kw", lambda a: torch.mean(a, dim=1), [x1], True),
        ("sum_then_scale", lambda a: a.sum(dim=0) * 3.0, [x0], True),
        ("softmax", lambda a: torch.softmax(a, dim=-1), [x0], True),
        ("softmax_pos", lambda a: F.softmax(a, 1), [x0], True),
        ("log_softmax", lambda a: a.log_softmax(dim=-1), [x0], True),
        ("softmax_unreduced", lambda a: torch.softmax(a, dim=-1), [u], False),
        ("exp_unreduced", lambda a: torch.exp(a), [u], False),
        ("scale_unreduced", lambda a: a * 2.0, [u], True),
        ("matmul", lambda a, b: a @ b, [x0, w_rep], True),
        ("matmul_row", lambda a, b: a @ b, [x1, w_row], True),
        ("linear_bias", lambda a, b, c: F.linear(a, b, c), [x0, wl, bl], True),
        ("linear", lambda a, b: F.linear(a, b), [x0, wl], True),
        ("chain", lambda a: (a + a).transpose(0, 1).sum(dim=0) * 2.0, [x], True),
        ("requires_grad_input", lambda a: (a * 2.0).transpose(0, 1), [xg], True),
        ("plain_operand", lambda a: a * torch.tensor(2.0, dtype=torch.float64), [x], False),
    ]
    for name, f, inputs, memo in cases:
        _check(name, f, inputs, memo, out)
    return out


def _cross_mesh(mesh, seed):
    """Meshes with the same axis names and different sizes: one spec, two local shapes."""
    world = mesh.size()
    other = mp.Mesh((2, world // 2), ("x", "y"))
    X = torch.randn(8, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    out: list[str] = []
    for m in (mesh, other, mesh):
        a = mp.shard(X, P("x"), m)
        _check(f"reshape on {m}", lambda t: t.reshape(-1, 3), [a], True, out)
        _check(f"sum on {m}", lambda t: t.sum(dim=0), [a], True, out)
    return out


def test_fast_path_matches_rules(pool):
    for res in pool.run(_fast_cases, (2, 2), ("x", "y"), 3):
        assert not res, "\n".join(res)


def test_fast_path_keys_meshes(pool):
    if pool.world_size < 4 or pool.world_size % 2:
        pytest.skip("needs an even world of at least 4 ranks")
    for res in pool.run(_cross_mesh, (pool.world_size,), ("x",), 5):
        assert not res, "\n".join(res)


def test_fast_key_tells_apart():
    from meshpar.sharding.tensor import fast_key
    f = torch.Tensor.mul
    assert fast_key(f, (1,)) != fast_key(f, (1.0,)) != fast_key(f, (True,))
    assert fast_key(f, (1,)) != fast_key(f, (True,))
    assert fast_key(f, ((1, 2),)) != fast_key(f, ([1, 2],))
    assert fast_key(f, ((1, True),)) is None  # a bool inside a sequence is not keyed
    assert fast_key(f, (torch.zeros(1),)) is None  # plain tensors are never keyed
    assert fast_key(f, (), {"dim": 1}) != fast_key(f, (1,))
    assert fast_key(f, (), {"dim": [1]}) != fast_key(f, (), {"dim": (1,)})
    assert fast_key(f, (), {"dim": torch.zeros(1)}) is None
    assert FAST._limit > 0


class _FakeMesh:
    """Enough of a Mesh for fast_key: the per-mesh layout table."""

    def __init__(self):
        self._layouts = {}


def test_fast_key_formats():
    from meshpar.sharding.tensor import ShardedTensor, fast_key
    m1, m2 = _FakeMesh(), _FakeMesh()
    x = ShardedTensor(torch.zeros(4, 2), P("x"), m1, (8, 2))
    x_again = ShardedTensor(torch.ones(4, 2), P("x"), m1, (8, 2))
    x_other_shape = ShardedTensor(torch.zeros(4, 3), P("x"), m1, (8, 3))
    x_other_spec = ShardedTensor(torch.zeros(8, 1), P(None, "x"), m1, (8, 2))
    x_other_mesh = ShardedTensor(torch.zeros(4, 2), P("x"), m2, (8, 2))
    f = torch.Tensor.transpose
    assert fast_key(f, (x, 0, 1)) == fast_key(f, (x_again, 0, 1))  # interned: same layout, same key
    assert fast_key(f, (x,)) == fast_key(f, (x_again,))
    assert fast_key(f, (x, x)) == fast_key(f, (x_again, x_again))
    keys = [fast_key(f, c, kw) for c, kw in [
        ((x, 0, 1), None), ((x, 1, 0), None), ((x, 0, True), None), ((x, 0.0, 1), None), ((x, (0, 1)), None),
        ((x, [0, 1]), None), ((x,), None), ((x, x), None), ((x, x_other_shape), None), ((x_other_shape,), None),
        ((x_other_spec,), None), ((x_other_mesh,), None), ((x,), {"dim": 1}), ((x,), {"dim": True}),
        ((x, 1), None), ((x,), {"dim": 1, "keepdim": False}), ((x, 1), {"keepdim": False}),
        ((x, x, 1), None), ((x, None), None), ((x, "a"), None), ((x,), {"dim": (1,)}), ((x,), {"dim": [1]}),
        ((1, x), None), ((1.0, x), None),
    ]]
    assert None not in keys
    assert len(set(keys)) == len(keys), "two different calls share a key"
    assert fast_key(f, (x, torch.zeros(1))) is None
    assert fast_key(f, (x,), {"out": torch.zeros(1)}) is None
    assert fast_key(f, (x, [x])) is None
