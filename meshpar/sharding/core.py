"""Autograd glue between ShardedTensors and the local blocks that op rules compute on.

Rules follow one pattern::

    a_local = enter(a, vary=...)          # plain tensor in the autograd graph
    out_local = <local math + collectives>
    return wrap(out_local, out_spec, mesh, out_shape)

Gradient convention (see :mod:`meshpar.mesh.autograd`): a value's gradient has the value's
layout, fully reduced. ``vary`` lists the axes over which the rule's per-rank results differ
while ``a`` is replicated; the block's gradient is summed over them in backward. A parameter
may defer that sum over some axes by carrying ``_meshpar_defer_reduce = ("data",)``; its
gradient then arrives *unreduced* over those axes (``grad.spec.unreduced``), for a
data-parallel reducer to sum in buckets.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch

from ..mesh import Mesh, collectives as C
from .spec import P
from .tensor import ShardedTensor


class _Enter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: ShardedTensor, vary: tuple[str, ...]):
        defer = tuple(getattr(x, "_meshpar_defer_reduce", ()) or ())
        ctx.spec, ctx.mesh, ctx.shape = x.spec, x.mesh, x._gshape
        ctx.sum_axes = tuple(a for a in vary if a not in defer)
        ctx.unreduced = tuple(a for a in vary if a in defer)
        return x._local.view_as(x._local)

    @staticmethod
    def backward(ctx, g):
        if g is None:
            return None, None
        if ctx.sum_axes:
            g = C.all_reduce(g, ctx.mesh, ctx.sum_axes)
        spec = ctx.spec.reduced().with_unreduced(ctx.unreduced) if ctx.unreduced else ctx.spec.reduced()
        return ShardedTensor(g, spec, ctx.mesh, ctx.shape), None


class _Wrap(torch.autograd.Function):
    @staticmethod
    def forward(ctx, local: torch.Tensor, spec: P, mesh: Mesh, shape: tuple[int, ...]):
        ctx.spec, ctx.mesh, ctx.shape = spec, mesh, shape
        return ShardedTensor(local.detach(), spec, mesh, shape)

    @staticmethod
    def backward(ctx, g):
        return grad_block(g, ctx.spec, ctx.mesh, ctx.shape), None, None, None


def grad_block(g, spec: P, mesh: Mesh, shape) -> torch.Tensor:
    """The local block, in layout ``spec`` (reduced), of a gradient given as a ShardedTensor or a global tensor."""
    if isinstance(g, ShardedTensor):
        if g.spec.entries != spec.entries or g.spec.unreduced:
            from .reshard import reshard_local
            return reshard_local(g._local, g.spec, P(*spec.entries), mesh, g._gshape)
        return g._local
    from .layout import block_slices
    return g[block_slices(shape, P(*spec.entries), mesh)]


def enter(x: ShardedTensor, vary: Iterable[str] = ()) -> torch.Tensor:
    """``x``'s block as a plain tensor in the autograd graph; backward sums its gradient over ``vary``."""
    vary = tuple(a for a in vary if x.mesh.size(a) > 1)
    if not (torch.is_grad_enabled() and x.requires_grad):
        return x._local
    return _Enter.apply(x, vary)


def wrap(local: torch.Tensor, spec: P, mesh: Mesh, shape: Sequence[int]) -> ShardedTensor:
    """A ShardedTensor around ``local`` (this rank's block), connected to ``local``'s autograd graph."""
    shape = tuple(int(s) for s in shape)
    if torch.is_grad_enabled() and local.requires_grad:
        return _Wrap.apply(local, spec, mesh, shape)
    return ShardedTensor(local, spec, mesh, shape)


class _SliceBlock(torch.autograd.Function):
    """Keep block ``index`` of ``dim`` (free); backward all-gathers the gradient over ``axes``."""

    @staticmethod
    def forward(ctx, x, mesh, axes, dim):
        ctx.mesh, ctx.axes, ctx.dim = mesh, axes, dim
        n = mesh.size(axes)
        return x.chunk(n, dim=dim)[mesh.axis_index(axes)].contiguous()

    @staticmethod
    def backward(ctx, g):
        return C.all_gather(g, ctx.mesh, ctx.axes, ctx.dim), None, None, None


def slice_block(x: torch.Tensor, mesh: Mesh, axes: tuple[str, ...], dim: int) -> torch.Tensor:
    """Replicated -> sharded over ``axes`` on ``dim`` as a free local slice (autograd-aware)."""
    if not axes or mesh.size(axes) == 1:
        return x
    if torch.is_grad_enabled() and x.requires_grad:
        return _SliceBlock.apply(x, mesh, tuple(axes), dim)
    n = mesh.size(axes)
    return x.chunk(n, dim=dim)[mesh.axis_index(axes)]


def reduce_unreduced(x: ShardedTensor) -> ShardedTensor:
    """Sum an unreduced (partial) tensor over its unreduced axes: the lazy reduction happens here."""
    if not x.spec.unreduced:
        return x
    from ..mesh.autograd import psum
    local = psum(enter(x), x.mesh, x.spec.unreduced)
    return wrap(local, x.spec.reduced(), x.mesh, x._gshape)


def local_in(x, out_spec: P, out_ndim: int, mesh: Mesh, slice_dims: bool = True,
             used: Iterable[str] | None = None) -> torch.Tensor:
    """The block of operand ``x`` (ShardedTensor, plain tensor or scalar) that an elementwise
    computation producing ``out_spec`` needs, with the right backward.

    ``x`` is right-aligned to ``out_ndim`` dims (broadcasting). Where the output is split over
    axes that ``x`` is replicated over: a real dimension is sliced (free), a broadcast one makes
    ``x`` vary (its gradient is summed). ``used`` (default: the axes ``out_spec`` splits or leaves
    unreduced) are the axes over which the computation's per-rank results differ.
    """
    if not isinstance(x, torch.Tensor):
        return x
    used = set(out_spec.used_axes()) if used is None else set(used)
    if isinstance(x, ShardedTensor):
        have = set(x.spec.used_axes())
        xdim = len(x._gshape)
        xspec = x.spec
        shape = x._gshape
    else:
        have = set()
        xdim = x.ndim
        xspec = P()
        shape = x.shape
    off = out_ndim - xdim
    slices: list[tuple[int, tuple[str, ...]]] = []
    sliced_axes: set[str] = set()
    if slice_dims:
        for d in range(xdim):
            oax = out_spec.axes_of(off + d)
            if not oax or shape[d] == 1:
                continue
            xax = xspec.axes_of(d)
            if xax == oax:
                continue
            if xax and oax[: len(xax)] == xax:
                extra = oax[len(xax):]
            elif not xax:
                extra = oax
            else:
                from ..errors import ShardingError
                raise ShardingError(f"operand spec {xspec} dim {d} is split over {xax} but the result needs {oax}; "
                                    f"reshard the operand to match")
            slices.append((d, extra))
            sliced_axes |= set(extra)
    vary = tuple(a for a in sorted(used - have - sliced_axes))
    if isinstance(x, ShardedTensor):
        loc = enter(x, vary)
    else:
        loc = x
        if vary and torch.is_grad_enabled() and x.requires_grad:
            from ..mesh.autograd import pvary
            loc = pvary(loc, mesh, vary)
    for d, extra in slices:
        loc = slice_block(loc, mesh, extra, d)
    return loc
