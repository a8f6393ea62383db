"""The one SUMMA/broadcast core shared by the 2D, 2.5D and 3D matmuls.

Every multi-step tensor-parallel matmul here is the same loop: in ``q`` steps, some operand
blocks ("panels") are broadcast along mesh axes from a step-dependent source member, a local
product is formed from the panels, and the products are combined. The broadcast of step
``t+1`` is issued before the local product of step ``t`` is computed, into the other half of a
double buffer, so communication overlaps compute.

Products are combined in one of two ways:

* **accumulate** (``ring_axis=None``): every step's product adds into this rank's own output
  block (SUMMA ``C = A·B``, stationary C).
* **ring-reduce** (``ring_axis=<axis>``): the product of step ``s`` belongs to the member
  ``d(s) = (own - s - 1) mod q`` along ``ring_axis``. Each rank adds the partial sum it received
  from its ring predecessor and passes it on; after ``q`` steps each rank holds the complete sum
  of its own block (SUMMA ``A·Bᵀ`` and ``Aᵀ·B``, stationary A or B). This is a reduce-scatter
  fused with the compute: each rank receives ``q-1`` output blocks, the same volume as ``q``
  reduces, with ``2`` output blocks of memory instead of ``q``.

Functions here work on plain local blocks (no autograd); the autograd Functions live in
:mod:`meshpar.ops.tp.summa` and :mod:`meshpar.ops.tp.cube`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ...mesh import Mesh
from ...mesh import collectives as C


@dataclass(frozen=True)
class Stream:
    """An operand whose blocks are broadcast along ``axis``: at step ``t`` every member receives
    the ``local`` block of the member at index ``src(t)`` along ``axis``.

    ``local`` must have the same shape and dtype on every member of ``axis``.
    """

    local: torch.Tensor
    axis: str


def ring_dest(mesh: Mesh, ring_axis: str, step: int) -> int:
    """Index along ``ring_axis`` of the member whose output block the product of ``step`` feeds."""
    q = mesh.size(ring_axis)
    return (mesh.coord(ring_axis) - step - 1) % q


def panel_loop(
    mesh: Mesh,
    steps: int,
    streams: Sequence[Stream],
    src: Callable[[int], int],
    product: Callable[[int, list[torch.Tensor], torch.Tensor | None], torch.Tensor],
    ring_axis: str | None = None,
) -> torch.Tensor:
    """Run ``steps`` SUMMA steps and return this rank's output block.

    Args:
        mesh: the mesh the stream and ring axes belong to.
        steps: number of steps ``q``.
        streams: operands broadcast each step (may be empty).
        src: step -> source index along each stream's axis for that step.
        product: ``product(step, panels, acc)`` -> tensor. In accumulate mode ``acc`` is the running
            output (``None`` at the first step) and the result becomes the new running output
            (use ``acc.addmm_`` to avoid a temporary). In ring mode ``acc`` is always ``None`` and
            the result is this step's partial product; the loop adds the predecessor's partial sum
            *after* the product is formed, so the ring transfer overlaps the matmul.
        ring_axis: ``None`` for accumulate mode, else the axis of the fused ring reduction
            (``steps`` must equal its size).
    """
    bufs = [[torch.empty_like(s.local), torch.empty_like(s.local)] for s in streams]

    def issue(t: int):
        return [C.broadcast(s.local, mesh, s.axis, src=src(t), async_op=True, out=bufs[k][t % 2])
                for k, s in enumerate(streams)]

    if ring_axis is not None:
        q = mesh.size(ring_axis)
        assert steps == q, (steps, q)
        ring = [(i, (i + 1) % q) for i in range(q)]
    acc: torch.Tensor | None = None
    inflight = None
    pending = issue(0) if steps else []
    for t in range(steps):
        panels = [p.wait() for p in pending]
        if t + 1 < steps:
            pending = issue(t + 1)
        if ring_axis is None:
            acc = product(t, panels, acc)
            continue
        part = product(t, panels, None)
        if inflight is not None:
            part = part.add_(inflight.wait())
        if t + 1 < steps:
            inflight = C.ppermute(part, mesh, ring_axis, ring, async_op=True)
        else:
            acc = part
    assert acc is not None
    return acc
