"""More exact sharded semantics (issue 12, second round): ``.mT`` on 3-D tensors, a plain tensor
expanded as a ShardedTensor, in-place ops on non-leaf tensors under autograd, floor/trunc division
and lower-precision casts of partial sums, inf/-inf/0 norms, int16 casts (gloo lacks int16), and
``tensor_split``/``resize_`` edge cases. Each case runs sharded and dense in float64 on 2 and 4 gloo
ranks and compares forward and input gradients; ``refuse`` cases must raise a ShardingError."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import meshpar as mp
from meshpar import P

INF = float("inf")
_G = torch.Generator().manual_seed(4321)
C16 = torch.randn(1, 6, dtype=torch.float64, generator=_G)
W_IN = torch.randn(18, 6, dtype=torch.float64, generator=_G)
B_IN = torch.randn(18, dtype=torch.float64, generator=_G)
W_OUT = torch.randn(6, 6, dtype=torch.float64, generator=_G)
B_OUT = torch.randn(6, dtype=torch.float64, generator=_G)


def _mha(a, b, m=None):
    """F.multi_head_attention_forward on x = a viewed as (L=4, N=2, E=6), 2 heads."""
    x = a.reshape(4, 2, 6)
    return F.multi_head_attention_forward(x, x, x, 6, 2, W_IN, B_IN, None, None, False, 0.0, W_OUT, B_OUT,
                                          training=False, need_weights=False)[0]


def _mm(a, b):
    """a[8,6] @ b[6,4] with the contraction split over "x": a partial sum (unreduced over "x")."""
    return a @ b


def _resize_same(a):
    y = a * 1
    with torch.no_grad():
        y.resize_(8, 6)
    return y


def _resize_partial(a, b, m=None):
    with torch.no_grad():
        y = _mm(a, b)
        y.resize_(2, 3)
    return y


def _floor_div_inplace(a, b, m=None):
    with torch.no_grad():
        y = _mm(a, b)
        y.div_(0.3, rounding_mode="floor")
    return y


# name -> (fn(a, b, mesh), spec_a, spec_b, differentiable, expected). a: (8, 6), b: (6, 4)
CASES = {
    "mT_3d_split": (lambda a, b, m: a.reshape(2, 4, 6).mT * 1, P("x"), P(), True, "pass"),
    "mT_3d_repl": (lambda a, b, m: a.reshape(2, 4, 6).mT.contiguous(), P(), P(), True, "pass"),
    "mT_3d_partial": (lambda a, b, m: _mm(a, b).reshape(2, 4, 4).mT + 1, P(None, "x"), P("x"), True, "pass"),
    "plain_expand_as_split": (lambda a, b, m: C16.expand_as(a) + a, P("x", "y"), P(), True, "pass"),
    "plain_expand_as_partial": (lambda a, b, m: C16[:, :4].expand_as(_mm(a, b)) * _mm(a, b), P(None, "x"), P("x"),
                                True, "pass"),
    "cat_plain_expand_as": (lambda a, b, m: torch.cat([C16.expand_as(a), a]), P(None, "x"), P(), True, "pass"),
    "nonleaf_inplace": (lambda a, b, m: a.clone().add_(1) * a.clone().zero_().add_(2) + a.clone().mul_(a),
                        P("x"), P(), True, "pass"),
    "nonleaf_inplace_partial": (lambda a, b, m: _mm(a, b).add_(1).mul_(2), P(None, "x"), P("x"), True, "pass"),
    "div_floor_partial": (lambda a, b, m: torch.div(_mm(a, b), 0.3, rounding_mode="floor"), P(None, "x"), P("x"),
                          False, "pass"),
    "div_trunc_partial": (lambda a, b, m: _mm(a, b).div(0.3, rounding_mode="trunc"), P(None, "x"), P("x"),
                          False, "pass"),
    "div_floor_inplace_partial": (_floor_div_inplace, P(None, "x"), P("x"), False, "pass"),
    "bfloat16_partial": (lambda a, b, m: _mm(a, b).bfloat16().double(), P(None, "x"), P("x"), False, "pass"),
    "half_partial": (lambda a, b, m: _mm(a, b).half().double(), P(None, "x"), P("x"), False, "pass"),
    "float32_partial": (lambda a, b, m: _mm(a, b).float().double(), P(None, "x"), P("x"), False, "pass"),
    "to_bf16_partial": (lambda a, b, m: _mm(a, b).to(torch.bfloat16).double(), P(None, "x"), P("x"), False, "pass"),
    "to_f64_partial_stays_partial": (lambda a, b, m: _mm(a, b).to(torch.float64) + 0, P(None, "x"), P("x"), True,
                                     "pass"),
    "norm_inf_split": (lambda a, b, m: torch.norm(a, p=INF), P("x", "y"), P(), True, "pass"),
    "norm_inf_repl": (lambda a, b, m: torch.norm(a, p=INF), P(), P(), True, "pass"),
    "norm_inf_partial": (lambda a, b, m: torch.norm(_mm(a, b), p=INF), P(None, "x"), P("x"), True, "pass"),
    "vnorm_ninf_split": (lambda a, b, m: torch.linalg.vector_norm(a, ord=-INF), P("x"), P(), True, "pass"),
    "vnorm_ninf_repl": (lambda a, b, m: torch.linalg.vector_norm(a, ord=-INF), P(), P(), True, "pass"),
    "vnorm_ninf_partial": (lambda a, b, m: torch.linalg.vector_norm(_mm(a, b), ord=-INF), P(None, "x"), P("x"),
                           True, "pass"),
    "vnorm_inf_dim_keepdim": (lambda a, b, m: torch.linalg.vector_norm(a, INF, 1, True), P("x", "y"), P(), True,
                              "pass"),
    "vnorm_0": (lambda a, b, m: torch.linalg.vector_norm(a.relu(), ord=0), P("x"), P(), True, "pass"),
    "short_split": (lambda a, b, m: (a * 10).short().double(), P("x", "y"), P(), False, "pass"),
    "short_partial": (lambda a, b, m: (_mm(a, b) * 10).short().double(), P(None, "x"), P("x"), False, "pass"),
    "short_sum_split": (lambda a, b, m: (a * 10).short().sum().double(), P("x"), P(), False, "pass"),
    "tensor_split_repl": (lambda a, b, m: torch.tensor_split(a, 3, dim=1)[1], P(), P(), True, "pass"),
    "tensor_split_partial": (lambda a, b, m: torch.tensor_split(_mm(a, b), 3, dim=1)[2] * 1, P(None, "x"), P("x"),
                             True, "pass"),
    "tensor_split_sharded_indices": (
        lambda a, b, m: torch.tensor_split(a, mp.shard(torch.tensor([1, 4]), P(), m), dim=1)[1], P("x"), P(), True,
        "pass"),
    "mha_repl": (_mha, P(), P(), True, "pass"),
    "group_norm_split": (lambda a, b, m: F.group_norm(a.reshape(4, 2, 6), 2), P("x"), P(), True, "pass"),
    "group_norm_repl": (lambda a, b, m: F.group_norm(a.reshape(2, 4, 6), 2), P(), P(), True, "pass"),
    "resize_same_shape": (lambda a, b, m: _resize_same(a), P("x"), P(), False, "pass"),
    "resize_partial": (_resize_partial, P(None, "x"), P("x"), False, "refuse"),
}


def _fit(spec, mesh):
    ents = []
    for e in spec.entries:
        ax = (e,) if isinstance(e, str) else (e or ())
        ax = tuple(a for a in ax if str.__str__(a) in mesh.names)
        ents.append(ax or None)
    return P(*ents)


def _run_case(mesh, name):
    fn, sa, sb, diff, _ = CASES[name]
    sa, sb = _fit(sa, mesh), _fit(sb, mesh)
    g = torch.Generator().manual_seed(7)
    a = torch.randn(8, 6, dtype=torch.float64, generator=g)
    b = torch.randn(6, 4, dtype=torch.float64, generator=g)
    sts = [mp.shard(a.clone(), sa, mesh).requires_grad_(diff), mp.shard(b.clone(), sb, mesh).requires_grad_(diff)]
    try:
        out = fn(*sts, mesh)
    except mp.ShardingError as e:
        return ("refuse", str(e))
    xs = [a.clone().requires_grad_(diff), b.clone().requires_grad_(diff)]
    ref = fn(*xs, None) if "sharded_indices" not in name else torch.tensor_split(xs[0], [1, 4], dim=1)[1]
    full = mp.unshard(out) if isinstance(out, mp.ShardedTensor) else out
    if tuple(full.shape) != tuple(ref.shape):
        return ("wrong", f"shape {tuple(full.shape)} vs {tuple(ref.shape)}")
    if full.dtype != ref.dtype:
        return ("wrong", f"dtype {full.dtype} vs {ref.dtype}")
    err = float((full.detach().double() - ref.detach().double()).abs().max()) if ref.numel() else 0.0
    if err > 1e-9:
        return ("wrong", f"forward err {err}")
    if diff and ref.requires_grad:
        cot = torch.randn(ref.shape, dtype=ref.dtype, generator=torch.Generator().manual_seed(3))
        (ref * cot).sum().backward()
        (full * cot).sum().backward()
        for x, s in zip(xs, sts):
            gs = mp.unshard(s.grad) if s.grad is not None else torch.zeros_like(x)
            gx = x.grad if x.grad is not None else torch.zeros_like(x)
            e = float((gs - gx).abs().max())
            if e > 1e-9:
                return ("wrong", f"grad err {e}")
    return ("pass", "")


def _run_all(mesh, names):
    out = {}
    for n in names:
        try:
            out[n] = _run_case(mesh, n)
        except Exception as e:  # noqa: BLE001 - anything but a ShardingError is a defect
            out[n] = ("error", f"{type(e).__name__}: {e}")
    return out


@pytest.mark.parametrize("mesh_shape,names", [((2,), ("x",)), ((2, 2), ("x", "y"))])
def test_semantics_more(pool, mesh_shape, names):
    res = pool.run(_run_all, mesh_shape, names, sorted(CASES))
    bad = []
    for r, by_case in enumerate(res):
        for n, (status, msg) in by_case.items():
            if status != CASES[n][4]:
                bad.append(f"rank {r} {n}: {status} {msg[:300]} (expected {CASES[n][4]})")
    assert not bad, "\n".join(bad)


def test_gloo_int16_collectives(pool):
    """int16/uint16 travel widened over gloo (gloo has no int16): exact, on every rank, no hang."""
    res = pool.run(_int16_collectives, (2,), ("x",))
    assert all(r == "ok" for r in res), res


def _int16_collectives(mesh):
    from meshpar.mesh import collectives as C
    r = mesh.axis_index("x")
    x = torch.full((3,), 100 + r, dtype=torch.int16)
    s = C.all_reduce(x, mesh, "x")
    g = C.all_gather(x, mesh, "x")
    y = torch.full((3,), 7, dtype=torch.uint16)
    C.all_reduce(y, mesh, "x", inplace=True)
    ok = (s.dtype == torch.int16 and s.tolist() == [201] * 3 and g.dtype == torch.int16
          and g.tolist() == [100] * 3 + [101] * 3 and y.tolist() == [14] * 3)
    return "ok" if ok else f"bad {s} {g} {y}"
