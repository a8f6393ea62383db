"""The local-contraction core shared by matmul, einsum and linear.

Operands are labelled per dimension (einsum style). A contraction runs blockwise, with at
most a lazy sum, when every label is split the same way on every operand that has it (or
replicated there, which is then sliced for free):

* a label kept in the output keeps its axes;
* a contracted label that is split makes the output *unreduced* over its axes;
* an operand replicated over axes the output varies over gets its gradient summed there.

This covers batch-sharded × replicated, Megatron 1D column (``W`` split on out) and row
(``X`` and ``W`` split on the contraction → unreduced, reduced lazily). When the labels are
split inconsistently (SUMMA 2D, 2.5D, 3D), :func:`plan_local` returns ``None`` and the caller
tries the registered multi-step algorithms.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

from ..mesh import Mesh
from ..sharding.core import apply_plan, meta, operand_plan, reduce_unreduced
from ..sharding.spec import P, base_axis
from ..sharding.tensor import ShardedTensor


@dataclass
class LocalPlan:
    out_spec: P
    out_shape: tuple[int, ...]
    operand_specs: list[P]          # the layout each operand is brought to (slicing replicated dims)
    operand_plans: tuple = ()


def _axes(x, d: int) -> tuple[str, ...]:
    return x.spec.axes_of(d) if isinstance(x, ShardedTensor) else ()


def plan_local(operands: list, labels: list[str], out_labels: str) -> LocalPlan | None:
    """Blockwise plan for ``einsum(labels -> out_labels)`` or None when labels are split inconsistently."""
    return _plan_local(tuple(meta(x) for x in operands), tuple(labels), out_labels)


def _m_axes(m, d):
    return m[1].axes_of(d) if m[0] == "S" else ()


def _m_shape(m):
    return m[2] if m[0] == "S" else m[1]


@functools.lru_cache(maxsize=4096)
def _plan_local(metas: tuple, labels: tuple, out_labels: str) -> LocalPlan | None:
    size: dict[str, int] = {}
    axes: dict[str, tuple[str, ...]] = {}
    for m, lab in zip(metas, labels):
        shp = _m_shape(m)
        for d, L in enumerate(lab):
            s = shp[d]
            if s != 1 or L not in size:
                size[L] = max(size.get(L, 1), s)
            ax = _m_axes(m, d)
            if ax:
                if L in axes and axes[L] != ax:
                    return None
                axes[L] = ax
    seen: dict[str, str] = {}
    for L, ax in axes.items():
        for a in map(base_axis, ax):
            if a in seen and seen[a] != L:
                return None
            seen[a] = L
    unred = set()
    for L, ax in axes.items():
        if L not in out_labels:
            unred |= set(ax)
    for m in metas:
        if m[0] == "S":
            if set(m[1].unreduced) & set(seen):
                return None
            unred |= set(m[1].unreduced)
    out_spec = P(*[axes.get(L) for L in out_labels], unreduced=tuple(unred))
    op_specs = [P(*[axes.get(L) if _m_shape(m)[d] == size[L] else None for d, L in enumerate(lab)])
                for m, lab in zip(metas, labels)]
    used = out_spec.used_axes()
    plans = tuple(operand_plan(m, spec, len(lab), used) for m, spec, lab in zip(metas, op_specs, labels))
    return LocalPlan(out_spec, tuple(size[L] for L in out_labels), op_specs, plans)


def run_local(fn, operands: list, labels: list[str], out_labels: str, mesh: Mesh, plan: LocalPlan):
    """Bring operands to the plan's layout (free slices, gradient sums) and run ``fn`` on blocks."""
    from ..sharding.core import wrap
    locs = [apply_plan(x, p, mesh) for x, p in zip(operands, plan.operand_plans)]
    return wrap(fn(*locs), plan.out_spec, mesh, plan.out_shape)


def reduce_extra_unreduced(operands: list) -> list:
    """Contractions are multilinear: keep at most one unreduced operand, reduce the others."""
    seen = False
    out = []
    for x in operands:
        if isinstance(x, ShardedTensor) and x.spec.unreduced:
            if seen:
                x = reduce_unreduced(x)
            seen = True
        out.append(x)
    return out
