"""Reductions over sharded dimensions.

* ``sum``/``mean`` over a split dimension give an *unreduced* result (a partial sum per rank);
  the all-reduce happens lazily, where a later op needs the value (or ``unshard``/``reshard``).
* ``amax``/``amin``/``max``/``min`` reduce locally, then take the max/min over the axes;
  gradients follow torch: ``amax`` splits among ties, ``max(dim)`` goes to the returned index.
* ``norm`` is built from the above (``sum(|x|^p)^(1/p)``, ``amax(|x|)`` for p=inf).

All of these are order-free, so they work over a :class:`~meshpar.Zigzag` dim too, except
``max``/``min`` *with indices* along it (the index is a position): that raises a ShardingError
asking for a reshard to contiguous.
"""
from __future__ import annotations

import math

import torch

from ..errors import ShardingError
from ..mesh import collectives as C
from ..sharding.core import enter, reduce_unreduced, wrap
from ..sharding.dispatch import register, remember_grad, remember_same_call, remember_unary
from ..sharding.spec import P
from ..sharding.tensor import ShardedTensor
from ._util import norm_dims

T = torch.Tensor


def _out_spec(spec: P, ndim: int, dims: tuple[int, ...], keepdim: bool, unreduced=()) -> P:
    ents = []
    for d in range(ndim):
        if d in dims:
            if keepdim:
                ents.append(None)
        else:
            ax = spec.axes_of(d)
            ents.append(ax if ax else None)
    return P(*ents, unreduced=unreduced)


def _out_shape(shape, dims, keepdim):
    return tuple((1 if d in dims else s) for d, s in enumerate(shape) if keepdim or d not in dims)


def _parse(args, kwargs, ndim):
    dim = kwargs.get("dim", args[1] if len(args) > 1 and not isinstance(args[1], torch.dtype) else None)
    keepdim = kwargs.get("keepdim", args[2] if len(args) > 2 and isinstance(args[2], bool) else False)
    return norm_dims(dim, ndim), bool(keepdim)


@register(torch.sum, T.sum, torch.mean, T.mean, torch.nansum, T.nansum)
def _sum(func, args, kwargs):
    x = args[0]
    if not isinstance(x, ShardedTensor):
        return NotImplemented
    nd = len(x._gshape)
    if nd == 0:  # dim=0/-1 of a 0-d tensor names no real dim: the exact aten fallback
        return NotImplemented
    dims, keepdim = _parse(args, kwargs, nd)
    dtype = kwargs.get("dtype")
    red_axes = tuple(a for d in dims for a in x.spec.axes_of(d))
    unred = tuple(sorted(set(x.spec.unreduced) | set(red_axes)))
    out_spec = _out_spec(x.spec, nd, dims, keepdim, unred)
    is_mean = func in (torch.mean, T.mean)
    denom = math.prod(x._gshape[d] for d in dims)
    full = dims == tuple(range(nd)) and not keepdim

    def local_fn(loc):
        if full:
            out = loc.sum(dtype=dtype) if dtype is not None else loc.sum()
        else:
            out = loc.sum(dim=dims, keepdim=keepdim, dtype=dtype) if dims else loc.clone()
        return out / denom if is_mean else out
    if dims and not (is_mean and red_axes):
        # sum (of a partial sum too) and mean over unsplit dims: the same call on the block
        remember_same_call(func, args, kwargs, out_spec, _out_shape(x._gshape, dims, keepdim))
    else:  # a block's mean divides by the block's count, not the global one
        remember_unary(func, args, kwargs, local_fn, out_spec, _out_shape(x._gshape, dims, keepdim))
    remember_grad(func, args, kwargs, local_fn, out_spec, _out_shape(x._gshape, dims, keepdim), x.mesh)
    loc = enter(x, ())
    if dims == tuple(range(nd)) and not keepdim:
        out = loc.sum(dtype=dtype) if dtype is not None else loc.sum()
    else:
        out = loc.sum(dim=dims, keepdim=keepdim, dtype=dtype) if dims else loc.clone()
    if is_mean:
        out = out / math.prod(x._gshape[d] for d in dims)
    return wrap(out, out_spec, x.mesh, _out_shape(x._gshape, dims, keepdim))


class _GlobalExtreme(torch.autograd.Function):
    """amax/amin over ``dims`` of a block, then over ``axes``; ties share the gradient (as torch)."""

    @staticmethod
    def forward(ctx, loc, mesh, axes, dims, keepdim, is_max):
        m = loc.amax(dim=dims, keepdim=True) if is_max else loc.amin(dim=dims, keepdim=True)
        if axes:
            m = C.all_reduce(m, mesh, axes, op="max" if is_max else "min")
        mask = loc == m
        cnt = mask.sum(dim=dims, keepdim=True)
        if axes:
            cnt = C.all_reduce(cnt, mesh, axes)
        ctx.save_for_backward(mask, cnt)
        ctx.dims, ctx.keepdim = dims, keepdim
        return m if keepdim else m.squeeze(dims) if dims else m

    @staticmethod
    def backward(ctx, g):
        mask, cnt = ctx.saved_tensors
        if not ctx.keepdim:
            for d in ctx.dims:
                g = g.unsqueeze(d)
        return g * mask / cnt, None, None, None, None, None


def _extreme(x: ShardedTensor, dims, keepdim, is_max):
    x = reduce_unreduced(x)
    nd = len(x._gshape)
    axes = tuple(a for d in dims for a in x.spec.axes_of(d))
    out = _GlobalExtreme.apply(enter(x, ()), x.mesh, axes, dims, keepdim, is_max)
    return wrap(out, _out_spec(x.spec, nd, dims, keepdim), x.mesh, _out_shape(x._gshape, dims, keepdim))


@register(torch.amax, T.amax, torch.amin, T.amin)
def _amax(func, args, kwargs):
    x = args[0]
    if not isinstance(x, ShardedTensor):
        return NotImplemented
    dims, keepdim = _parse(args, kwargs, len(x._gshape))
    return _extreme(x, dims, keepdim, func in (torch.amax, T.amax))


class _ArgExtremeValues(torch.autograd.Function):
    """Values of max/min along one dim with global indices; gradient goes to the chosen index."""

    @staticmethod
    def forward(ctx, loc, mesh, axes, dim, offset, keepdim, is_max):
        v, i = (loc.max(dim=dim, keepdim=True) if is_max else loc.min(dim=dim, keepdim=True))
        gi = i + offset
        if axes:
            best = C.all_reduce(v, mesh, axes, op="max" if is_max else "min")
            big = torch.iinfo(torch.int64).max
            cand = torch.where(v == best, gi, torch.full_like(gi, big))
            gi = C.all_reduce(cand, mesh, axes, op="min")
            v = best
        mine = (gi >= offset) & (gi < offset + loc.shape[dim])
        ctx.save_for_backward(mine, (gi - offset).clamp(0, loc.shape[dim] - 1))
        ctx.dim, ctx.keepdim, ctx.shape = dim, keepdim, loc.shape
        ctx.mark_non_differentiable(gi)
        if not keepdim:
            v, gi = v.squeeze(dim), gi.squeeze(dim)
        return v, gi

    @staticmethod
    def backward(ctx, g, _gi):
        mine, li = ctx.saved_tensors
        if not ctx.keepdim:
            g = g.unsqueeze(ctx.dim)
        out = torch.zeros(ctx.shape, dtype=g.dtype, device=g.device)
        out.scatter_(ctx.dim, li, g * mine)
        return out, None, None, None, None, None, None


@register(torch.max, T.max, torch.min, T.min)
def _max(func, args, kwargs):
    x = args[0]
    is_max = func in (torch.max, T.max)
    if not isinstance(x, ShardedTensor):
        return NotImplemented
    nd = len(x._gshape)
    if len(args) > 1 and isinstance(args[1], torch.Tensor):
        from .pointwise import elementwise
        return elementwise(torch.maximum if is_max else torch.minimum, args[:2], {})
    dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
    if dim is None:
        return _extreme(x, tuple(range(nd)), False, is_max)
    keepdim = kwargs.get("keepdim", args[2] if len(args) > 2 else False)
    if nd == 0:  # dim=0/-1 of a 0-d tensor names no real dim: the exact aten fallback
        return NotImplemented
    d = norm_dims(dim, nd)[0]
    if x.spec.layout_of(d) == "zigzag":
        raise ShardingError(
            f"{func.__name__}(dim={d}) returns positions, but dim {d} of {x.spec} is in the zigzag layout; reshard "
            f"it to contiguous first: meshpar.reshard(x, {x.spec.contiguous()}), or use amax/amin for the values")
    x = reduce_unreduced(x)
    axes = x.spec.axes_of(d)
    loc_len = x._local.shape[d]
    offset = (x.mesh.axis_index(axes) if axes else 0) * loc_len
    v, i = _ArgExtremeValues.apply(enter(x, ()), x.mesh, axes, d, offset, keepdim, is_max)
    spec = _out_spec(x.spec, nd, (d,), keepdim)
    shape = _out_shape(x._gshape, (d,), keepdim)
    from torch.return_types import max as rmax, min as rmin
    rt = rmax if is_max else rmin
    return rt((wrap(v, spec, x.mesh, shape), ShardedTensor(i, spec, x.mesh, shape)))


@register(torch.norm, T.norm, torch.linalg.vector_norm)
def _norm(func, args, kwargs):
    x = args[0]
    if not isinstance(x, ShardedTensor):
        return NotImplemented
    p = kwargs.get("p", kwargs.get("ord", args[1] if len(args) > 1 else 2))
    if p is None or p == "fro":
        p = 2
    if isinstance(p, str):  # matrix norms ("nuc"): the exact aten fallback (through linalg.matrix_norm's aten ops)
        return NotImplemented
    dim = kwargs.get("dim", args[2] if len(args) > 2 else None)
    keepdim = kwargs.get("keepdim", args[3] if len(args) > 3 else False)
    if kwargs.get("dtype") is not None:
        x = x.to(kwargs["dtype"])
    a = x.abs()
    red = {} if dim is None else {"dim": dim, "keepdim": keepdim}
    if math.isinf(p):
        return a.amax(**red) if p > 0 else a.amin(**red)
    if p == 0:  # the number of nonzero entries (a.pow(0) keeps it in autograd, with torch's zero gradient)
        return (a.pow(0) * (a != 0).to(a.dtype)).sum(**red)
    s = (a ** p).sum(**red)
    return s ** (1.0 / p)


@register(T.item, T.__float__, T.__int__, T.__bool__, T.tolist)
def _item(func, args, kwargs):
    x = args[0]
    loc = x._local.detach()
    if x.spec.unreduced:
        loc = C.all_reduce(loc, x.mesh, x.spec.unreduced)
    if func is T.tolist:
        from ..sharding.api import unshard
        with torch.no_grad():
            return unshard(x).tolist()
    if x._gshape.numel() != 1:
        raise ValueError(f"{func.__name__} needs a one-element tensor, this one has global shape {tuple(x._gshape)}")
    return func(loc)
