"""Hypothesis strategies for sharded tests: meshes, specs of every kind, operands and operand mixes.

Every strategy draws *descriptions* that pickle cheaply (mesh shapes, specs, shapes, seeds,
small float64 tensors), so a test draws in the main process and runs one
:meth:`~meshpar.testing.WorkerPool.run` per example::

    from hypothesis import given
    from meshpar.testing import strategies as mst

    @given(case=mst.binary_operands(max_ranks=4))
    def test_add(pool, case):
        pool.run(check_add, case.mesh_shape, case.names, case.a, case.b)

Spec kinds (:data:`SPEC_KINDS`):

========== ================================================================
split      each mesh axis splits some dim or none (``P("x", None)``)
tuple      two or more axes split one dim, major to minor (``P(("x", "y"))``)
zigzag     ``P(Zigzag("x"))``: the load-balanced head-tail layout on one dim
replicated ``P()``
partial    a split spec plus ``unreduced=`` axes: the value is a sum of per-rank shares
========== ================================================================

Operand kinds (:data:`OPERAND_KINDS`): ``sharded`` (a :class:`~meshpar.testing.Sharded` of any spec
kind), ``replicated`` (``Sharded(value, P())``), ``plain`` (a ``torch.Tensor`` every rank holds),
``scalar`` (a Python float or int).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from hypothesis import strategies as st

from ..sharding import P, Zigzag
from .compare import Sharded

MESHES = [((2,), ("x",)), ((4,), ("x",)), ((8,), ("x",)), ((2, 2), ("x", "y")), ((2, 4), ("x", "y")),
          ((4, 2), ("x", "y")), ((2, 2, 2), ("x", "y", "z")), ((1, 2), ("x", "y"))]
SMALL_MESHES = [m for m in MESHES if math.prod(m[0]) <= 4]
SPEC_KINDS = ("split", "tuple", "zigzag", "replicated", "partial")
OPERAND_KINDS = ("sharded", "replicated", "plain", "scalar")


def meshes(max_ranks: int = 8, min_ranks: int = 1) -> st.SearchStrategy[tuple[tuple[int, ...], tuple[str, ...]]]:
    """``(mesh_shape, axis_names)`` with ``min_ranks <= ranks <= max_ranks``."""
    return st.sampled_from([m for m in MESHES if min_ranks <= math.prod(m[0]) <= max_ranks])


@st.composite
def mesh_spec_shape(draw, ndim: int | None = None, meshes=MESHES, max_mult: int = 3):
    """(mesh_shape, names, spec, global shape) with every split dim divisible (contiguous splits only)."""
    shape, names = draw(st.sampled_from(meshes))
    nd = ndim if ndim is not None else draw(st.integers(1, 3))
    per_dim: list[list[str]] = [[] for _ in range(nd)]
    for a in names:
        d = draw(st.integers(-1, nd - 1))
        if d >= 0:
            per_dim[d].append(a)
    sizes = dict(zip(names, shape))
    gshape = []
    for d in range(nd):
        n = math.prod(sizes[a] for a in per_dim[d])
        gshape.append(n * draw(st.integers(1, max_mult)))
    spec = P(*[tuple(ax) if ax else None for ax in per_dim])
    return shape, names, spec, tuple(gshape)


@st.composite
def spec_for(draw, names, sizes: dict, gshape):
    """A random contiguous spec over ``names`` that divides ``gshape``."""
    nd = len(gshape)
    per_dim: list[list[str]] = [[] for _ in range(nd)]
    for a in draw(st.permutations(names)):
        d = draw(st.integers(-1, nd - 1))
        if d >= 0:
            n = math.prod(sizes[b] for b in per_dim[d]) * sizes[a]
            if gshape[d] % n == 0:
                per_dim[d].append(a)
    return P(*[tuple(ax) if ax else None for ax in per_dim])


@st.composite
def specs(draw, names: Sequence[str], sizes: dict, gshape: Sequence[int], kinds: Sequence[str] = SPEC_KINDS):
    """A spec of one of ``kinds`` over mesh ``names`` that fits ``gshape`` (falls back to ``P()``).

    ``partial`` adds ``unreduced=`` axes (those of size > 1 not used to split) to a split spec.
    """
    kind = draw(st.sampled_from(list(kinds)))
    nd = len(gshape)
    if kind == "replicated" or nd == 0:
        return P() if kind != "partial" else P(unreduced=_some(draw, [a for a in names if sizes[a] > 1]))
    if kind == "zigzag":
        opts = [(d, a) for d in range(nd) for a in names if gshape[d] % (2 * sizes[a]) == 0]
        if not opts:
            return P()
        d, a = draw(st.sampled_from(opts))
        ents: list[Any] = [None] * nd
        ents[d] = Zigzag(a)
        # other axes may split other dims
        for b in names:
            if b == a:
                continue
            e = draw(st.integers(-1, nd - 1))
            if e >= 0 and e != d and ents[e] is None and gshape[e] % sizes[b] == 0:
                ents[e] = b
        return P(*ents)
    if kind == "tuple" and len(names) >= 2:
        axes = draw(st.permutations(list(names)))[: draw(st.integers(2, len(names)))]
        n = math.prod(sizes[a] for a in axes)
        opts = [d for d in range(nd) if gshape[d] % n == 0]
        if opts:
            ents = [None] * nd
            ents[draw(st.sampled_from(opts))] = tuple(axes)
            return P(*ents)
    spec = draw(spec_for(names, sizes, gshape))
    if kind == "partial":
        free = [a for a in names if sizes[a] > 1 and a not in spec.used_axes()]
        if free:
            return spec.with_unreduced(_some(draw, free))
    return spec


def _some(draw, axes: list[str]) -> tuple[str, ...]:
    if not axes:
        return ()
    k = draw(st.integers(1, len(axes)))
    return tuple(draw(st.permutations(axes))[:k])


@st.composite
def global_shapes(draw, mesh_shape: Sequence[int], ndim: tuple[int, int] = (1, 3), max_mult: int = 2):
    """A small global shape whose dims are multiples of small products of the mesh sizes (so that many
    specs, Zigzag included, divide it)."""
    nd = draw(st.integers(*ndim))
    base = [1] + sorted({s for s in mesh_shape if s > 1} | {2 * s for s in mesh_shape if s > 1})
    return tuple(draw(st.sampled_from(base)) * draw(st.integers(1, max_mult)) for _ in range(nd))


def tensor(shape: Sequence[int], seed: int, *, positive: bool = False) -> torch.Tensor:
    """A float64 tensor of ``shape`` from ``seed`` (deterministic; pickles small)."""
    t = torch.randn(tuple(shape), dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    return t.abs() + 0.5 if positive else t


@dataclass(frozen=True)
class Case:
    """A drawn test case: the mesh and the operands (``Sharded``, tensors or scalars)."""
    mesh_shape: tuple[int, ...]
    names: tuple[str, ...]
    operands: tuple
    kinds: tuple[str, ...]

    @property
    def a(self):
        return self.operands[0]

    @property
    def b(self):
        return self.operands[1]


@st.composite
def operand(draw, names, sizes: dict, shape: Sequence[int], kinds: Sequence[str] = OPERAND_KINDS,
            spec_kinds: Sequence[str] = SPEC_KINDS, positive: bool = False):
    """One operand of ``shape``: ``(kind, value)`` with value a Sharded / Tensor / Python scalar."""
    kind = draw(st.sampled_from(list(kinds)))
    seed = draw(st.integers(0, 10_000))
    if kind == "scalar":
        v = draw(st.sampled_from([0.5, 2.0, -1.5, 3]))
        return kind, (abs(v) if positive else v)
    t = tensor(shape, seed, positive=positive)
    if kind == "plain":
        return kind, t
    if kind == "replicated":
        return kind, Sharded(t, P())
    return kind, Sharded(t, draw(specs(names, sizes, shape, spec_kinds)))


@st.composite
def binary_operands(draw, max_ranks: int = 8, first_spec_kinds: Sequence[str] = SPEC_KINDS,
                    other_kinds: Sequence[str] = OPERAND_KINDS, broadcast: bool = True, positive_b: bool = False):
    """A :class:`Case` with two operands: the first a ShardedTensor of any spec kind, the second any
    operand kind, of the same shape or (``broadcast``) a broadcastable suffix shape."""
    mshape, names = draw(meshes(max_ranks))
    sizes = dict(zip(names, mshape))
    shape = draw(global_shapes(mshape))
    _, a = draw(operand(names, sizes, shape, kinds=("sharded",), spec_kinds=first_spec_kinds))
    bshape = list(shape)
    if broadcast and draw(st.booleans()):
        bshape = bshape[draw(st.integers(0, len(bshape) - 1)):]
        bshape = [1 if draw(st.booleans()) else s for s in bshape]
    kb, b = draw(operand(names, sizes, bshape, kinds=other_kinds, positive=positive_b))
    return Case(tuple(mshape), tuple(names), (a, b), ("sharded", kb))


@st.composite
def unary_operand(draw, max_ranks: int = 8, spec_kinds: Sequence[str] = SPEC_KINDS,
                  ndim: tuple[int, int] = (1, 3)):
    """A :class:`Case` with one ShardedTensor operand of any spec kind."""
    mshape, names = draw(meshes(max_ranks))
    sizes = dict(zip(names, mshape))
    shape = draw(global_shapes(mshape, ndim=ndim))
    _, a = draw(operand(names, sizes, shape, kinds=("sharded",), spec_kinds=spec_kinds))
    return Case(tuple(mshape), tuple(names), (a,), ("sharded",))


def inplace_variants() -> st.SearchStrategy[bool]:
    """Whether to use the in-place variant of an op (``a.add_(b)`` instead of ``a + b``)."""
    return st.booleans()


__all__ = ["MESHES", "SMALL_MESHES", "SPEC_KINDS", "OPERAND_KINDS", "meshes", "mesh_spec_shape", "spec_for", "specs",
           "global_shapes", "tensor", "Case", "operand", "binary_operands", "unary_operand", "inplace_variants"]
