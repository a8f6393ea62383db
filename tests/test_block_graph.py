"""Block-graph results: under autograd a ShardedTensor result keeps its graph on its block.

Every case is compared with the same computation on dense float64 tensors: forward values, the
gradients of the inputs and parameters, and what the autograd API reports (``requires_grad``,
``is_leaf``, ``grad_fn``, retained gradients, hooks). Cases cover each way a user hands a tensor to
the autograd engine (``backward``, ``torch.autograd.backward/grad`` with gradients given as
ShardedTensors in another layout and as plain tensors, intermediate inputs), in-place writes (on the
block, through the exact fallback, into a tensor without a graph), ops with no rule (exact fallback),
and code the dispatcher cannot see (``autograd.Function.apply``, reentrant checkpointing), which must
raise rather than lose a gradient.
"""
from __future__ import annotations

import pytest
import torch
import torch.utils.checkpoint as ckpt

import meshpar as mp
from meshpar import P, ShardingError

MESH = ((2, 2), ("x", "y"))


def _inputs(mesh, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(4, 6, dtype=torch.float64, generator=g)
    W = torch.randn(6, 6, dtype=torch.float64, generator=g)
    B = torch.randn(6, dtype=torch.float64, generator=g)
    dense = [t.clone().requires_grad_() for t in (X, W, B)]
    sh = [mp.shard(X, P("x", "y"), mesh).requires_grad_(), mp.shard(W, P(None, "y"), mesh).requires_grad_(),
          mp.shard(B, P(), mesh).requires_grad_()]
    return dense, sh


def _body(x, w, b):
    h = torch.nn.functional.linear(x, w, b)
    h = torch.nn.functional.gelu(h) * 2.0 + x
    return torch.softmax(h, dim=-1) * x


def _close(a, b) -> bool:
    a = mp.unshard(a) if isinstance(a, mp.ShardedTensor) else a
    b = mp.unshard(b) if isinstance(b, mp.ShardedTensor) else b
    if a is None or b is None:
        return a is None and b is None
    return a.shape == b.shape and torch.allclose(a, b, rtol=1e-10, atol=1e-10)


def _api_case(mesh):
    bad = []
    for how in ("backward", "backward_sharded_grad", "backward_plain_grad", "autograd_backward", "grad",
                "grad_intermediate", "memo_second_call"):
        (X, W, B), (x, w, b) = _inputs(mesh)
        if how == "memo_second_call":
            _body(x, w, b)  # the first call plans and memoises; the one below is served by the memo
        y, ref = _body(x, w, b), _body(X, W, B)
        if not _close(y, ref):
            bad.append(f"{how}: forward differs")
        if not (y.requires_grad and not y.is_leaf and y.grad_fn is not None and y.grad is None):
            bad.append(f"{how}: autograd attributes {y.requires_grad, y.is_leaf, y.grad_fn, y.grad}")
        G = torch.randn(4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        if how == "backward":
            y.sum().backward()
            ref.sum().backward()
        elif how == "backward_sharded_grad":
            y.backward(mp.shard(G, P("y", None), mesh))  # the gradient in another layout than y's
            ref.backward(G)
        elif how == "backward_plain_grad":
            y.backward(G)
            ref.backward(G)
        elif how == "autograd_backward":
            torch.autograd.backward([y, (y * y).sum()], [mp.shard(G, P(), mesh), None])
            torch.autograd.backward([ref, (ref * ref).sum()], [G, None])
        elif how in ("grad", "grad_intermediate"):
            h = torch.nn.functional.linear(x, w, b) if how == "grad_intermediate" else x
            H = torch.nn.functional.linear(X, W, B) if how == "grad_intermediate" else X
            out = (torch.tanh(h) * w[0]).sum()
            gs = torch.autograd.grad(out, [h, w])
            gd = torch.autograd.grad((torch.tanh(H) * W[0]).sum(), [H, W])
            for i, (s, d) in enumerate(zip(gs, gd)):
                if not _close(s, d):
                    bad.append(f"{how}: grad {i} differs")
            if how == "grad_intermediate" and not (isinstance(gs[0], mp.ShardedTensor) and gs[0].spec == h.spec):
                bad.append(f"{how}: intermediate's gradient not in its layout: {type(gs[0])}")
            continue
        else:
            y.sum().backward()
            ref.sum().backward()
        for name, s, d in (("x", x, X), ("w", w, W), ("b", b, B)):
            if not _close(s.grad, d.grad):
                bad.append(f"{how}: {name}.grad differs")
            elif s.grad.spec != s.spec:
                bad.append(f"{how}: {name}.grad layout {s.grad.spec} != {s.spec}")
    return bad


def test_autograd_api_on_block_graph_results(pool):
    for bad in pool.run(_api_case, *MESH):
        assert not bad, bad


def _hooks_case(mesh):
    bad = []
    (X, W, B), (x, w, b) = _inputs(mesh)
    h, H = x * w[0], X * W[0]
    h.retain_grad()
    H.retain_grad()
    seen = []
    h2, H2 = torch.sin(h), torch.sin(H)
    h2.register_hook(lambda g: (seen.append(g), g * 3)[1])
    H2.register_hook(lambda g: g * 3)
    if not h.retains_grad:
        bad.append("retains_grad is False after retain_grad()")
    (h2 * h).sum().backward()
    (H2 * H).sum().backward()
    if not _close(h.grad, H.grad):
        bad.append("retained grad differs")
    if not (len(seen) == 1 and isinstance(seen[0], mp.ShardedTensor) and _close(seen[0], H)):
        bad.append("hook did not see the ShardedTensor gradient (which equals H here)")
    for name, s, d in (("x", x, X), ("w", w, W)):
        if not _close(s.grad, d.grad):
            bad.append(f"{name}.grad differs after a scaling hook")
    try:
        (x * 2).requires_grad_(False)
        bad.append("requires_grad_(False) on a computed result did not raise")
    except RuntimeError:
        pass
    y = x * 2
    y.detach_()
    if y.requires_grad or y.grad_fn is not None or not _close(y, X * 2):
        bad.append("detach_ left a graph or changed the value")
    return bad


def test_hooks_retain_grad_requires_grad_detach(pool):
    for bad in pool.run(_hooks_case, *MESH):
        assert not bad, bad


def _inplace_case(mesh):
    bad = []
    cases = {
        "mul_ and += on the block": lambda x, w, o: ((x * 1.0).mul_(w[0]).__iadd__(x)),
        "add_ of another layout (exact fallback)": lambda x, w, o: (x * 1.0).add_(o(x.detach() * 0 + w[:4, :])),
        "setitem": lambda x, w, o: _setitem(x * 1.0, w),
        "clamp_min_ (no rule)": lambda x, w, o: (x * w[1]).clamp_min_(0.1),
        "write into a tensor without a graph": lambda x, w, o: o(x.detach() * 0).add_(x * w[2]),
        "copy_ into a tensor without a graph": lambda x, w, o: o(x.detach() * 0).copy_(torch.cos(x)),
    }
    for name, f in cases.items():
        (X, W, B), (x, w, b) = _inputs(mesh)
        y = f(x, w, lambda t: mp.reshard(t, P("y", None)) if "another" in name else t)
        ref = f(X, W, lambda t: t)
        if not _close(y, ref):
            bad.append(f"{name}: forward differs")
            continue
        (y * y).sum().backward()
        (ref * ref).sum().backward()
        for n, s, d in (("x", x, X), ("w", w, W)):
            if not _close(s.grad, d.grad):
                bad.append(f"{name}: {n}.grad differs")
    return bad


def _setitem(y, w):
    y[1:3] = w[:2, :] * 2
    return y


def test_inplace_writes_under_autograd(pool):
    for bad in pool.run(_inplace_case, *MESH):
        assert not bad, bad


class _Double(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, g):
        return g * 2


def _hidden_case(mesh):
    bad = []
    (X, W, B), (x, w, b) = _inputs(mesh)
    ref = _Double.apply(X * W[0]).sum()
    ref.backward()
    try:
        _Double.apply(x * w[0]).sum().backward()
        bad.append("Function.apply on a computed result: backward did not raise")
    except ShardingError as e:
        if "meshpar.tracked" not in str(e):
            bad.append(f"unhelpful error: {e}")
    x.grad = w.grad = None
    _Double.apply(mp.tracked(x * w[0])).sum().backward()
    if not (_close(x.grad, X.grad) and _close(w.grad, W.grad)):
        bad.append("tracked(): gradients differ")
    x.grad = w.grad = None
    try:
        torch.autograd.grad(_Double.apply(x * w[0]).sum(), [w])
        bad.append("autograd.grad through Function.apply did not raise")
    except ShardingError:
        pass
    x.grad = w.grad = None
    try:
        ckpt.checkpoint(torch.sin, x * w[0], use_reentrant=True).sum().backward()
        bad.append("reentrant checkpoint: backward did not raise")
    except ShardingError:
        pass
    x.grad = w.grad = None
    X.grad = W.grad = None
    ckpt.checkpoint(torch.sin, x * w[0], use_reentrant=False).sum().backward()
    ckpt.checkpoint(torch.sin, X * W[0], use_reentrant=False).sum().backward()
    if not (_close(x.grad, X.grad) and _close(w.grad, W.grad)):
        bad.append("non-reentrant checkpoint: gradients differ")
    return bad


def test_code_the_dispatcher_cannot_see_raises_or_is_tracked(pool):
    for bad in pool.run(_hidden_case, *MESH):
        assert not bad, bad


def _roots_case(mesh, spec):
    X = torch.arange(1.0, 9.0, dtype=torch.float64).requires_grad_()
    if spec.unreduced:
        x = mp.from_local(X.detach() / 2, spec, mesh, (8,)).requires_grad_()  # each rank holds half of X
        loss = (x * 3).sum()  # a partial scalar: each rank holds its share
        loss.backward()
        return _close(x.grad, torch.full((8,), 3.0, dtype=torch.float64))
    x = mp.shard(X.detach(), spec, mesh).requires_grad_()
    (torch.exp(x) * 2).sum().backward()
    (torch.exp(X) * 2).sum().backward()
    return _close(x.grad, X.grad)


@pytest.mark.parametrize("spec", [P("x"), P(mp.Zigzag("x")), P(unreduced=("x",))], ids=["split", "zigzag", "partial"])
def test_scalar_and_partial_roots(pool, spec):
    assert all(pool.run(_roots_case, (2,), ("x",), spec))


def _inplace_split_operand_case(mesh):
    """A replicated target written in place from a split operand: each rank needs the whole operand (the
    exact fallback gathers it); the blockwise path once broadcast each rank's half over the target."""
    A = torch.tensor([1.5, -0.25], dtype=torch.float64)  # blocks of one element: they broadcast silently
    B = torch.tensor([2.0, 0.75], dtype=torch.float64)
    bad = []
    for grad in (False, True):
        a, b = mp.shard(A.clone(), P(), mesh), mp.shard(B.clone(), P("x"), mesh)
        if grad:
            a = a.requires_grad_() * 1.0
        a.add_(b)
        if not _close(a.detach() if grad else a, A + B):
            bad.append(f"grad={grad}: {mp.unshard(a).tolist()} != {(A + B).tolist()}")
    return bad


def test_inplace_replicated_target_split_operand(pool):
    for bad in pool.run(_inplace_split_operand_case, (2,), ("x",)):
        assert not bad, bad


def test_autograd_api_example_runs():
    """``torchrun --nproc-per-node 2 examples/autograd_api.py`` (it checks its gradients against dense)."""
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        "examples/autograd_api.py"], cwd=root, env=env, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert "match dense" in p.stdout and "refuses" in p.stdout


def _leaf_cache_case(mesh):
    """A leaf's entered block is cached across forwards; it must follow the leaf's block: an in-place update
    (an optimizer step), new data behind the same block object (``.data =``, as ZeRO-3 regathers),
    ``requires_grad`` switched off, and a different vary (same leaf, other rule)."""
    bad = []
    W = torch.randn(4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))  # same on every rank
    w = mp.shard(W.clone(), P("x"), mesh).requires_grad_()  # (shard keeps a view: W itself would change)
    b = mp.shard(torch.ones(6, dtype=torch.float64), P(), mesh).requires_grad_()
    (w * b).sum().backward()  # enters w and b (b varies over x: its gradient is summed)
    with torch.no_grad():
        w.mul_(2)  # in place: the cached entered block must not serve the old version's graph
    w.grad = b.grad = None
    (w * w * b).sum().backward()
    if not _close(w.grad, 2 * (2 * W) * 1.0):
        bad.append("after an in-place update: wrong gradient")
    new = torch.full_like(w._local, 3.0)
    w._local.data = new  # new data behind the same block object
    y = w * 1.0
    if not _close(y, torch.full((4, 6), 3.0, dtype=torch.float64)):
        bad.append("after .data =: the old block was used")
    w.requires_grad = False
    if (w * 2).requires_grad:
        bad.append("after requires_grad = False: the result still requires grad")
    w.requires_grad_(True)
    b.grad = None
    ((w * b).sum() + (b * 2).sum()).backward()  # b with and without vary in one graph
    if not _close(b.grad, torch.full((6,), 4 * 3.0 + 2.0, dtype=torch.float64)):
        bad.append(f"b used with two varies: wrong gradient {mp.unshard(b.grad).tolist()}")
    return bad


def test_leaf_entered_block_cache_follows_the_leaf(pool):
    for bad in pool.run(_leaf_cache_case, (2,), ("x",)):
        assert not bad, bad


def _deepcopy_case(mesh):
    """``copy.deepcopy`` of a parallelized module after a training backward (its parameters hold the
    dispatcher's cached autograd-connected blocks): the copy has equal values in the same layouts, its own
    storage, is still made of Parameters, and trains to the same gradients; a computed result refuses."""
    import copy
    bad = []
    torch.manual_seed(0)
    lin = torch.nn.Linear(6, 4).double()
    mp.parallelize(lin, mesh, {"weight": P("x"), "bias": P()})
    x = mp.shard(torch.randn(3, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1)), P(), mesh)
    (lin(x) * 2).sum().backward()
    twin = copy.deepcopy(lin)
    for (n, p), q in zip(lin.named_parameters(), twin.parameters()):
        if not (isinstance(q, torch.nn.Parameter) and q.spec == p.spec and _close(q, p.detach())
                and q._local.data_ptr() != p._local.data_ptr() and _close(q.grad, p.grad)):
            bad.append(f"{n}: the copy differs")
    lin.zero_grad()
    twin.zero_grad()
    (lin(x) ** 2).sum().backward()
    (twin(x) ** 2).sum().backward()
    for (n, p), q in zip(lin.named_parameters(), twin.parameters()):
        if not (_close(q.grad, p.grad) and q.grad.spec == p.grad.spec):
            bad.append(f"{n}: the copy trains to other gradients")
    try:
        copy.deepcopy(lin(x))
        bad.append("deepcopy of a computed result did not raise")
    except RuntimeError:
        pass
    return bad


def test_deepcopy_of_a_trained_sharded_module(pool):
    for bad in pool.run(_deepcopy_case, (2,), ("x",)):
        assert not bad, bad
