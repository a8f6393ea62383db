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

from dataclasses import dataclass

import torch

from ..errors import ShardingError
from ..mesh import Mesh
from ..sharding.core import local_in, reduce_unreduced
from ..sharding.spec import P
from ..sharding.tensor import ShardedTensor
from ._util import gshape


@dataclass
class LocalPlan:
    out_spec: P
    out_shape: tuple[int, ...]
    operand_specs: list[P]          # the layout each operand is brought to (slicing replicated dims)


def _axes(x, d: int) -> tuple[str, ...]:
    return x.spec.axes_of(d) if isinstance(x, ShardedTensor) else ()


def plan_local(operands: list, labels: list[str], out_labels: str) -> LocalPlan | None:
    """Blockwise plan for ``einsum(labels -> out_labels)`` or None when labels are split inconsistently."""
    size: dict[str, int] = {}
    axes: dict[str, tuple[str, ...]] = {}
    for x, lab in zip(operands, labels):
        shp = gshape(x)
        for d, L in enumerate(lab):
            s = shp[d]
            if s != 1 or L not in size:
                size[L] = max(size.get(L, 1), s)
            ax = _axes(x, d)
            if ax:
                if L in axes and axes[L] != ax:
                    return None
                axes[L] = ax
    seen: dict[str, str] = {}
    for L, ax in axes.items():
        for a in ax:
            if a in seen and seen[a] != L:
                return None
            seen[a] = L
    unred = set()
    for L, ax in axes.items():
        if L not in out_labels:
            unred |= set(ax)
    for x in operands:
        if isinstance(x, ShardedTensor):
            if set(x.spec.unreduced) & set(seen):
                return None
            unred |= set(x.spec.unreduced)
    out_spec = P(*[axes.get(L) for L in out_labels], unreduced=tuple(unred))
    op_specs = [P(*[axes.get(L) if gshape(x)[d] == size[L] else None for d, L in enumerate(lab)])
                for x, lab in zip(operands, labels)]
    return LocalPlan(out_spec, tuple(size[L] for L in out_labels), op_specs)


def run_local(fn, operands: list, labels: list[str], out_labels: str, mesh: Mesh, plan: LocalPlan):
    """Bring operands to the plan's layout (free slices, gradient sums) and run ``fn`` on blocks."""
    from ..sharding.core import wrap
    used = plan.out_spec.used_axes()
    locs = [local_in(x, spec, len(lab), mesh, used=used)
            for x, lab, spec in zip(operands, labels, plan.operand_specs)]
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
