"""The reshard planner: turn one layout into another with the cheapest collectives.

Steps, in order (``n`` = size of the axes involved, ``b`` = local bytes):

1. unreduced axes that go away: reduce-scatter into a dimension when the target splits that
   dimension over the axis next (``(n-1)/n·b``), else all-reduce;
2. per dimension, axes that go away (the suffix past the common prefix with the target):
   all-to-all when that single axis moves onto the end of another dimension (``(n-1)/n·b``),
   else one all-gather (``(n-1)·b``);
3. axes the target adds: a free local slice;
4. axes that become unreduced: the value stays on index 0, others hold zeros (free).

:class:`~meshpar.Zigzag` axes take part like any axis; a zigzag axis and its plain name are
different axes to the planner, so zigzag <-> contiguous on one dim is an all-gather then a
slice. Executing a step on a zigzag axis adds local reorders (:mod:`.zigzag`): the all-gather
puts the gathered dim back in natural order, the slice keeps chunks ``r`` and ``2n-1-r``, a
reduce-scatter into a zigzag dim reorders it to storage order first, and an all-to-all moving a
zigzag axis between dims reorders both dims.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..mesh import Mesh, collectives as C
from ..mesh import autograd as A
from . import zigzag as Z
from .spec import P, base_axis, is_zigzag


@dataclass(frozen=True)
class Step:
    kind: str                  # psum | reduce_scatter | all_gather | all_to_all | slice | keep_first
    axes: tuple[str, ...]
    dim: int = -1
    dim2: int = -1             # all_to_all: concat dim (the dim that loses the axis)


def plan(src: P, tgt: P, ndim: int) -> list[Step]:
    """The steps that take a block laid out by ``src`` to one laid out by ``tgt``."""
    cur = [tuple(src.axes_of(d)) for d in range(ndim)]
    want = [tuple(tgt.axes_of(d)) for d in range(ndim)]
    cur_unred = set(src.unreduced)
    steps: list[Step] = []
    in_use = {a for ax in cur for a in ax}
    psum_axes = []
    for a in sorted(cur_unred - set(tgt.unreduced)):
        done = False
        for d in range(ndim):
            nxt = want[d][len(cur[d]): len(cur[d]) + 1]  # the next axis the target splits d over (maybe Zigzag(a))
            if nxt and base_axis(nxt[0]) == a and want[d][: len(cur[d])] == cur[d] and a not in in_use:
                steps.append(Step("reduce_scatter", nxt, d))
                cur[d] = cur[d] + nxt
                in_use.add(a)
                done = True
                break
        if not done:
            psum_axes.append(a)
    if psum_axes:
        steps.insert(0, Step("psum", tuple(psum_axes)))
    for d in range(ndim):
        common = 0
        while common < min(len(cur[d]), len(want[d])) and cur[d][common] == want[d][common]:
            common += 1
        drop = cur[d][common:]
        if not drop:
            continue
        if len(drop) == 1:
            a = drop[0]
            target_dims = [e for e in range(ndim) if e != d and want[e] == cur[e] + (a,)]
            if target_dims:
                e = target_dims[0]
                steps.append(Step("all_to_all", (a,), e, d))
                cur[d] = cur[d][:common]
                cur[e] = cur[e] + (a,)
                continue
        steps.append(Step("all_gather", drop, d))
        cur[d] = cur[d][:common]
    for d in range(ndim):
        extra = want[d][len(cur[d]):]
        if extra:
            steps.append(Step("slice", extra, d))
            cur[d] = want[d]
    new_unred = tuple(sorted(set(tgt.unreduced) - cur_unred))
    if new_unred:
        steps.append(Step("keep_first", new_unred))
    return steps


def run_steps(local: torch.Tensor, steps: Sequence[Step], mesh: Mesh, differentiable: bool) -> torch.Tensor:
    """Execute ``steps`` on a local block (autograd-aware when ``differentiable``)."""
    from .core import slice_block
    x = local
    for s in steps:
        if s.kind == "psum":
            x = A.psum(x, mesh, s.axes) if differentiable else C.all_reduce(x, mesh, s.axes)
        elif s.kind == "reduce_scatter" and is_zigzag(s.axes):
            x = Z.zigzag_reduce_scatter(x, mesh, s.axes, s.dim, differentiable)
        elif s.kind == "reduce_scatter":
            x = A.psum_scatter(x, mesh, s.axes, s.dim) if differentiable else C.reduce_scatter(x, mesh, s.axes, s.dim)
        elif s.kind == "all_gather" and is_zigzag(s.axes):
            x = Z.zigzag_gather(x, mesh, s.axes, s.dim, differentiable)
        elif s.kind == "all_gather":
            x = A.all_gather(x, mesh, s.axes, s.dim) if differentiable else C.all_gather(x, mesh, s.axes, s.dim)
        elif s.kind == "all_to_all" and is_zigzag(s.axes):
            x = Z.zigzag_all_to_all(x, mesh, s.axes, s.dim, s.dim2, differentiable)
        elif s.kind == "all_to_all":
            x = (A.all_to_all(x, mesh, s.axes, s.dim, s.dim2) if differentiable
                 else C.all_to_all(x, mesh, s.axes, s.dim, s.dim2))
        elif s.kind == "slice" and is_zigzag(s.axes):
            x = Z.zigzag_slice(x, mesh, s.axes, s.dim) if differentiable else Z.take_local(
                x, mesh.size(s.axes), mesh.axis_index(s.axes), s.dim)
        elif s.kind == "slice":
            x = slice_block(x, mesh, s.axes, s.dim) if differentiable else (
                x.chunk(mesh.size(s.axes), dim=s.dim)[mesh.axis_index(s.axes)].contiguous())
        elif s.kind == "keep_first":
            if mesh.axis_index(s.axes) != 0:
                x = x * 0
        else:  # pragma: no cover
            raise AssertionError(s)
    return x


def reshard_local(local: torch.Tensor, src: P, tgt: P, mesh: Mesh, shape: Sequence[int]) -> torch.Tensor:
    """Non-differentiable reshard of a raw block (used for gradients)."""
    return run_steps(local, plan(src, tgt, len(shape)), mesh, differentiable=False)
