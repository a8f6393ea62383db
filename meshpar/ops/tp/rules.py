"""Matmul algorithms over ShardedTensors, chosen by the operands' specs.

Each ``*_matmul(a, b)`` returns the result ShardedTensor, or ``None`` when the specs are not its
pattern (the dispatcher then tries the next candidate). A spec pair that is clearly meant for an
algorithm but cannot work (a non-square SUMMA grid, a 3D weight that does not fit its input, a
contraction dim split differently on the two sides) raises :class:`ShardingError` before any
collective is issued.

================  ==============================  ====================  ==============================
algorithm         a (X, [..., K])                 b (W, [K, N])         result
================  ==============================  ====================  ==============================
SUMMA 2D / 2.5D   P(.., (..r..), .., c)           P(r, c), |r| = |c|    P(.., (..r..), .., c)
3D                P(.., (pre.., i, j), .., k)     P(k, (j, i))          P(.., (pre.., i, k), .., j)
batched local     P(*batch, m, None)              P(*batch, None, n)    P(*batch, m, n)
================  ==============================  ====================  ==============================

Axes that split X's leading dims but are not used by W (2.5D depth, data) run independent
copies of the algorithm; W's gradient is summed over them (``enter(w, vary=...)``; a parameter
marked ``_meshpar_defer_reduce`` keeps it unreduced for the data-parallel reducer).
"""
from __future__ import annotations

from ...errors import ShardingError
from ...sharding.core import enter, wrap
from ...sharding.spec import P, base_axis
from ...sharding.tensor import ShardedTensor
from .cube import cube_3d
from .summa import summa_2d

Axes = tuple[str, ...]

_LAYOUTS = ("layouts that work for x[..., K] @ w[K, N]: SUMMA 2D x P('x', None, 'y') @ w P('x', 'y'); "
            "2.5D x P(('d', 'x'), None, 'y') @ w P('x', 'y'); 3D x P(('i', 'j'), None, 'k') @ w P('k', ('j', 'i')); "
            "1D column x P() @ w P(None, 'tp'); 1D row x P(None, None, 'tp') @ w P('tp', None)")


def _fits(a, b) -> bool:
    return (isinstance(a, ShardedTensor) and isinstance(b, ShardedTensor) and a.mesh == b.mesh
            and not a.spec.unreduced and not b.spec.unreduced and a.ndim >= 2 and b.ndim == 2)


def _check_k(a: ShardedTensor, b: ShardedTensor, algo: str) -> None:
    if a.shape[-1] != b.shape[0]:
        raise ShardingError(f"{algo}: x{tuple(a.shape)} @ w{tuple(b.shape)}: x's last dim ({a.shape[-1]}) "
                            f"must equal w's dim 0 ({b.shape[0]})")


def summa_matmul(a: ShardedTensor, b: ShardedTensor) -> ShardedTensor | None:
    """SUMMA 2D (and 2.5D / data×2D, which add axes to X's leading dims). ``None`` if not its pattern."""
    if not _fits(a, b):
        return None
    mesh = a.mesh
    ax, bx = a.spec.padded(a.ndim), b.spec.padded(2)
    if len(bx[0]) != 1 or len(bx[1]) != 1 or ax[-1] != bx[1]:
        return None
    r, c = bx[0][0], bx[1][0]
    lead = [x for e in ax[:-1] for x in e]
    if r not in lead:
        return None
    if mesh.size(r) != mesh.size(c):
        raise ShardingError(
            f"SUMMA 2D x{tuple(a.shape)} {a.spec} @ w{tuple(b.shape)} {b.spec}: the grid must be square, but mesh axis "
            f"{r!r} has {mesh.size(r)} ranks and {c!r} has {mesh.size(c)}; use a mesh with |{r}| = |{c}|, or 1D "
            f"tensor parallelism (w P(None, {c!r})) on a non-square mesh")
    _check_k(a, b, "SUMMA 2D")
    extra = tuple(x for x in lead if x != r)
    xl = enter(a)
    wl = enter(b, vary=extra)
    yl = summa_2d(xl, wl, mesh, r, c)
    return wrap(yl, a.spec, mesh, tuple(a.shape[:-1]) + (b.shape[1],))


def cube_matmul(a: ShardedTensor, b: ShardedTensor) -> ShardedTensor | None:
    """3D: x P(.., (pre.., i, j), .., k) @ w P(k, (j, i)) -> P(.., (pre.., i, k), .., j). ``None`` if not its pattern."""
    if not _fits(a, b):
        return None
    mesh = a.mesh
    ax, bx = a.spec.padded(a.ndim), b.spec.padded(2)
    if len(bx[0]) != 1 or len(bx[1]) != 2 or ax[-1] != bx[0]:
        return None
    k = bx[0][0]
    j, i = bx[1]
    dims = [d for d, e in enumerate(ax[:-1]) if len(e) >= 2 and e[-2:] == (i, j)]
    if not dims:
        tails = [e[-2:] for e in ax[:-1] if len(e) >= 2]
        hint = (f"; for this input the weight must be P({k!r}, {(tails[0][1], tails[0][0])!r})" if tails else
                f"; shard a leading dim of x over ({i!r}, {j!r}) (e.g. x P(({i!r}, {j!r}), None, {k!r}))")
        raise ShardingError(
            f"3D x{tuple(a.shape)} {a.spec} @ w{tuple(b.shape)} {b.spec}: the weight's output dim is split over "
            f"{(j, i)}, so x needs a leading dim whose split ends with ({i!r}, {j!r}) (major to minor), and none "
            f"does{hint}")
    _check_k(a, b, "3D")
    d = dims[0]
    out = list(ax)
    out[d] = ax[d][:-1] + (k,)
    out[-1] = (j,)
    used = {x for e in ax for x in e}
    extra = tuple(sorted(used - {i, j, k}))
    xl = enter(a)
    wl = enter(b, vary=extra)
    yl = cube_3d(xl, wl, mesh, i, j, k, dim=d)
    return wrap(yl, P.from_axes(out), mesh, tuple(a.shape[:-1]) + (b.shape[1],))


def batched_matmul(a: ShardedTensor, b: ShardedTensor) -> ShardedTensor | None:
    """Batched ``a[*B, m, k] @ b[*B, k, n]`` with identical batch specs (attention ``q·kᵀ``, ``probs·v``).

    The batch dims carry the mode's split (e.g. ``P(("d", "x"), "y")`` for 2.5D heads, ``P(("i", "k"), "j")``
    for 3D); ``m`` and ``n`` may be split over further axes (sequence parallel queries), and a
    contraction dim split the same way on both sides gives a result unreduced over those axes.
    Purely local: no communication in forward; in backward an operand's gradient is summed over
    the axes that split the *other* operand's free dim.
    """
    if not (isinstance(a, ShardedTensor) and isinstance(b, ShardedTensor) and a.mesh == b.mesh):
        return None
    if a.ndim < 3 or a.ndim != b.ndim or a.spec.unreduced or b.spec.unreduced:
        return None
    ax, bx = a.spec.padded(a.ndim), b.spec.padded(b.ndim)
    if ax[:-2] != bx[:-2] or tuple(a.shape[:-2]) != tuple(b.shape[:-2]) or ax[-1] != bx[-2]:
        return None
    if a.shape[-1] != b.shape[-2]:
        raise ShardingError(f"batched matmul {tuple(a.shape)} @ {tuple(b.shape)}: contraction sizes differ")
    m, n, red = ax[-2], bx[-1], ax[-1]
    if {base_axis(x) for x in m} & {base_axis(x) for x in n}:
        return None
    out = P.from_axes(ax[:-2] + (m, n), unreduced=red)
    al = enter(a, vary=n)
    bl = enter(b, vary=m)
    return wrap(al @ bl, out, a.mesh, tuple(a.shape[:-1]) + (b.shape[-1],))


def diagnose_matmul(a: ShardedTensor, b: ShardedTensor) -> ShardedTensor | None:
    """Last candidate for ``x[..., K] @ w[K, N]``: never computes; raises a ShardingError that names the
    mismatch when the contraction dim is split differently on the two sides, else returns ``None``."""
    if not _fits(a, b):
        return None
    ax, bx = a.spec.padded(a.ndim), b.spec.padded(2)
    ka, kb = ax[-1], bx[0]
    if ka == kb:
        clash = [(d, x) for d, e in enumerate(ax[:-1]) for x in e if x in bx[1]]
        if not clash:
            return None
        d, x = clash[0]
        raise ShardingError(
            f"matmul x{tuple(a.shape)} {a.spec} @ w{tuple(b.shape)} {b.spec}: w's output dim is split over {x!r}, "
            f"which already splits x's dim {d}; the result cannot be split over {x!r} twice. {_LAYOUTS}")
    raise ShardingError(
        f"matmul x{tuple(a.shape)} {a.spec} @ w{tuple(b.shape)} {b.spec}: the contraction dim is split over "
        f"{ka or 'nothing'} in x (its last dim) but over {kb or 'nothing'} in w (its dim 0), and no algorithm "
        f"joins these layouts; reshard one operand. {_LAYOUTS}")
