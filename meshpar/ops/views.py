"""Views and shape ops: reshape/view, transpose/permute, (un)squeeze, flatten, split/chunk, cat,
stack and basic indexing. All are local (no communication).

reshape rule: dims are matched in groups with equal products (as torch does). Within a group,
only the group's first (major) input dim may be split, and the first output dim of the group
inherits its axes, which must divide it. Anything else needs an explicit reshard.

Zigzag (:class:`~meshpar.Zigzag`) dims: permute/transpose/(un)squeeze/expand/stack carry the tag
along; a reshape keeps it correct too (a zigzag chunk of the major dim is a run of whole rows of
the minor dims), as long as the new major dim is a multiple of ``2n``. Slicing, integer indexing,
split/chunk/unbind and cat *along* a zigzag dim refuse (as for any split dim): reshard it first.
"""
from __future__ import annotations

import math
from typing import Sequence

from torch.utils._pytree import tree_map

import torch

from ..errors import ShardingError
from ..sharding.core import enter, local_in, wrap
from ..sharding.dispatch import register, remember, remember_grad, remember_same_call
from ..sharding.spec import P, is_zigzag
from ..sharding.tensor import ShardedTensor, layout, local_fn_exec
from ._util import common_mesh, norm_dim

T = torch.Tensor


def _infer_shape(shape: Sequence[int], numel: int) -> list[int]:
    shape = list(shape)
    if -1 in shape:
        i = shape.index(-1)
        rest = math.prod(s for j, s in enumerate(shape) if j != i)
        shape[i] = numel // rest if rest else 0
    if math.prod(shape) != numel:
        raise RuntimeError(f"shape {shape} is invalid for input of size {numel}")
    return shape


def _groups(a: Sequence[int], b: Sequence[int]) -> list[tuple[list[int], list[int]]]:
    """Pair runs of dims of ``a`` and ``b`` with equal products (size-1 dims get their own groups)."""
    i = j = 0
    out = []
    while i < len(a) or j < len(b):
        ga, gb = [], []
        pa = pb = 1
        if i < len(a) and a[i] == 1 and (j >= len(b) or b[j] != 1):
            out.append(([i], []))
            i += 1
            continue
        if j < len(b) and b[j] == 1 and (i >= len(a) or a[i] != 1):
            out.append(([], [j]))
            j += 1
            continue
        if i < len(a):
            ga.append(i); pa *= a[i]; i += 1
        if j < len(b):
            gb.append(j); pb *= b[j]; j += 1
        while pa != pb:
            if pa < pb:
                ga.append(i); pa *= a[i]; i += 1
            else:
                gb.append(j); pb *= b[j]; j += 1
        out.append((ga, gb))
    return out


def reshape_spec(shape: Sequence[int], spec: P, new_shape: Sequence[int], mesh) -> P:
    """Spec of ``x.reshape(new_shape)`` for ``x`` laid out by ``spec`` (ShardingError if not local)."""
    ents: list = [None] * len(new_shape)
    for ga, gb in _groups(list(shape), list(new_shape)):
        for k, d in enumerate(ga):
            ax = spec.axes_of(d)
            if not ax:
                continue
            if k != 0 or not gb:
                raise ShardingError(
                    f"reshape {tuple(shape)} -> {tuple(new_shape)}: dim {d} is split over {ax} but is not the major "
                    f"dim of the merged group {[shape[i] for i in ga]}; reshard dim {d} to replicated first, or "
                    "split a major dim instead")
            n = mesh.size(ax)
            if is_zigzag(ax) and n > 1:
                n *= 2
            if new_shape[gb[0]] % n:
                raise ShardingError(
                    f"reshape {tuple(shape)} -> {tuple(new_shape)}: new dim {gb[0]} of size {new_shape[gb[0]]} must "
                    f"stay split over {ax} ({n} {'zigzag chunks' if is_zigzag(ax) else 'blocks'}) but does not "
                    "divide; reshard first")
            ents[gb[0]] = ax
    return P(*ents, unreduced=spec.unreduced)


def _local_shape(shape, spec, mesh):
    return [s // mesh.size(spec.axes_of(d)) if spec.axes_of(d) else s for d, s in enumerate(shape)]


@register(T.reshape, torch.reshape, T.view, T.flatten, torch.flatten, T.unflatten, torch.unflatten,
          T.view_as, T.reshape_as)
def _reshape(func, args, kwargs):
    x = args[0]
    if not isinstance(x, ShardedTensor):
        return NotImplemented
    shape = list(x._gshape)
    numel = math.prod(shape)
    if func in (T.flatten, torch.flatten):
        s = norm_dim(kwargs.get("start_dim", args[1] if len(args) > 1 else 0), len(shape))
        e = norm_dim(kwargs.get("end_dim", args[2] if len(args) > 2 else -1), len(shape))
        new = shape[:s] + [math.prod(shape[s:e + 1])] + shape[e + 1:]
    elif func in (T.unflatten, torch.unflatten):
        d = norm_dim(kwargs.get("dim", args[1]), len(shape))
        sizes = list(kwargs.get("sizes", args[2]))
        sizes = _infer_shape(sizes, shape[d])
        new = shape[:d] + sizes + shape[d + 1:]
    elif func in (T.view_as, T.reshape_as):
        new = list(args[1].shape)
    else:
        if func is T.view and len(args) == 2 and isinstance(args[1], torch.dtype):
            raise ShardingError("view(dtype) on a ShardedTensor is not supported")
        rest = args[1:] if args[1:] else (kwargs.get("shape") or kwargs.get("size"),)
        new = list(rest[0]) if len(rest) == 1 and isinstance(rest[0], (tuple, list, torch.Size)) else list(rest)
        new = _infer_shape(new, numel)
    spec = reshape_spec(shape, x.spec, new, x.mesh)
    lshape = tuple(_local_shape(new, spec, x.mesh))
    if not torch.is_grad_enabled():
        remember(func, args, kwargs, local_fn_exec(lambda l: l.reshape(lshape), layout(spec, new, x.mesh)))
    else:
        remember_grad(func, args, kwargs, lambda l: l.reshape(lshape), spec, new, x.mesh)
    loc = enter(x).reshape(lshape)
    return wrap(loc, spec, x.mesh, new)


def _permute(x: ShardedTensor, perm: Sequence[int], call=None) -> ShardedTensor:
    """``x.permute(perm)``; ``call`` = (func, args, kwargs) of a transpose/permute/t call, whose
    same call on the block is memoised for no-grad calls."""
    nd = len(x._gshape)
    perm = [norm_dim(p, nd) for p in perm]
    spec = P(*[x.spec.axes_of(p) or None for p in perm], unreduced=x.spec.unreduced)
    shape = [x._gshape[p] for p in perm]
    if call is not None:
        remember_same_call(*call, spec, shape)
        remember_grad(*call, lambda l: l.permute(perm), spec, shape, x.mesh)
    return wrap(enter(x).permute(perm), spec, x.mesh, shape)


@register(T.permute, torch.permute)
def _perm(func, args, kwargs):
    x = args[0]
    perm = kwargs.get("dims", args[1:] if len(args) > 2 else args[1])
    if isinstance(perm, int):
        perm = args[1:]
    return _permute(x, list(perm), (func, args, kwargs))


@register(T.transpose, torch.transpose, T.swapaxes, torch.swapaxes, T.swapdims, torch.swapdims)
def _transpose(func, args, kwargs):
    x = args[0]
    nd = len(x._gshape)
    a = norm_dim(kwargs.get("dim0", args[1]), nd)
    b = norm_dim(kwargs.get("dim1", args[2]), nd)
    perm = list(range(nd))
    perm[a], perm[b] = perm[b], perm[a]
    return _permute(x, perm, (func, args, kwargs))


@register(T.t, torch.t)
def _t(func, args, kwargs):
    x = args[0]
    nd = len(x._gshape)
    return _permute(x, [1, 0] if nd == 2 else list(range(nd)), (func, args, kwargs))


@register(T.T.__get__, T.mT.__get__)
def _T(func, args, kwargs):
    x = args[0]
    nd = len(x._gshape)
    if func == T.mT.__get__:  # a method-wrapper: a new object on each attribute access, so ``==``, not ``is``
        perm = list(range(nd - 2)) + [nd - 1, nd - 2]
    else:
        perm = list(reversed(range(nd)))
    return _permute(x, perm)


@register(T.unsqueeze, torch.unsqueeze)
def _unsqueeze(func, args, kwargs):
    x = args[0]
    nd = len(x._gshape)
    d = kwargs.get("dim", args[1])
    d = d % (nd + 1)
    ents = [x.spec.axes_of(i) or None for i in range(nd)]
    ents.insert(d, None)
    shape = list(x._gshape)
    shape.insert(d, 1)
    return wrap(enter(x).unsqueeze(d), P(*ents, unreduced=x.spec.unreduced), x.mesh, shape)


@register(T.squeeze, torch.squeeze)
def _squeeze(func, args, kwargs):
    x = args[0]
    nd = len(x._gshape)
    dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
    dims = range(nd) if dim is None else ([dim] if isinstance(dim, int) else dim)
    dims = {norm_dim(d, nd) for d in dims if x._gshape[norm_dim(d, nd)] == 1}
    keep = [i for i in range(nd) if i not in dims]
    spec = P(*[x.spec.axes_of(i) or None for i in keep], unreduced=x.spec.unreduced)
    loc = enter(x)
    for d in sorted(dims, reverse=True):
        loc = loc.squeeze(d)
    return wrap(loc, spec, x.mesh, [x._gshape[i] for i in keep])


def _require_unsplit(x: ShardedTensor, d: int, what: str) -> None:
    if x.spec.axes_of(d):
        raise ShardingError(f"{what} along dim {d}, which is split over {x.spec.axes_of(d)} in {x.spec}; "
                            f"reshard dim {d} to replicated first (meshpar.reshard)")


@register(T.split, torch.split, T.chunk, torch.chunk, T.unbind, torch.unbind, T.tensor_split, torch.tensor_split)
def _split(func, args, kwargs):
    x = args[0]
    if not isinstance(x, ShardedTensor):
        return NotImplemented
    nd = len(x._gshape)
    if func in (T.unbind, torch.unbind):
        d = norm_dim(kwargs.get("dim", args[1] if len(args) > 1 else 0), nd)
    else:
        d = norm_dim(kwargs.get("dim", args[2] if len(args) > 2 else 0), nd)
    _require_unsplit(x, d, func.__name__)
    # split sizes / indices given as a (replicated or partial) ShardedTensor are values: use the global ones
    rest = [a.tolist() if isinstance(a, ShardedTensor) else a for a in args[1:]]
    kwargs = {k: (v.tolist() if isinstance(v, ShardedTensor) else v) for k, v in kwargs.items()}
    locs = func(enter(x), *rest, **kwargs)
    out = []
    for loc in locs:
        shape = list(x._gshape)
        if func in (T.unbind, torch.unbind):
            shape.pop(d)
            spec = P(*[x.spec.axes_of(i) or None for i in range(nd) if i != d], unreduced=x.spec.unreduced)
        else:
            shape[d] = loc.shape[d]
            spec = x.spec
        out.append(wrap(loc, spec, x.mesh, shape))
    return tuple(out)


@register(torch.cat, torch.concat, torch.concatenate, torch.stack)
def _cat(func, args, kwargs):
    tensors = list(kwargs.get("tensors", args[0]))
    dim = kwargs.get("dim", args[1] if len(args) > 1 else 0)
    sts = [t for t in tensors if isinstance(t, ShardedTensor)]
    mesh = common_mesh(sts)
    ref = sts[0]
    nd = len(ref._gshape)
    stack = func is torch.stack
    d = dim % (nd + 1) if stack else norm_dim(dim, nd)
    from ..sharding.api import shard
    specs = {t.spec for t in sts}
    if len(specs) > 1:
        raise ShardingError(f"{func.__name__}: operands have different specs {sorted(map(str, specs))}; reshard to one")
    spec = ref.spec
    if spec.unreduced and len(sts) != len(tensors):
        # a plain tensor is a value: it would be counted once per rank next to partial sums
        raise ShardingError(f"{func.__name__}: partial sums {spec} next to plain tensors; reduce them first "
                            f"(meshpar.reshard(x, {spec.reduced()}))")
    if not stack:
        _require_unsplit(ref, d, func.__name__)
    tensors = [t if isinstance(t, ShardedTensor) else shard(t, spec.reduced(), mesh) for t in tensors]
    locs = [enter(t) for t in tensors]
    out = func(locs, d)
    shape = list(ref._gshape)
    if stack:
        shape.insert(d, len(tensors))
        ents = [spec.axes_of(i) or None for i in range(nd)]
        ents.insert(d, None)
        spec = P(*ents, unreduced=spec.unreduced)
    else:
        shape[d] = sum(t._gshape[d] for t in tensors)
    return wrap(out, spec, mesh, shape)


@register(T.__getitem__)
def _getitem(func, args, kwargs):
    x, idx = args[0], args[1]
    if not isinstance(x, ShardedTensor):
        return NotImplemented
    if not isinstance(idx, tuple):
        idx = (idx,)
    if any(isinstance(i, (torch.Tensor, list)) for i in idx):
        return NotImplemented  # advanced indexing: the exact aten fallback
    nd = len(x._gshape)
    n_real = sum(1 for i in idx if i is not None and i is not Ellipsis)
    if any(i is Ellipsis for i in idx):
        k = next(j for j, i in enumerate(idx) if i is Ellipsis)
        idx = idx[:k] + (slice(None),) * (nd - n_real) + idx[k + 1:]
    idx = idx + (slice(None),) * (nd - sum(1 for i in idx if i is not None))
    ents, shape, local_idx = [], [], []
    d = 0
    for i in idx:
        if i is None:
            ents.append(None); shape.append(1); local_idx.append(None)
            continue
        ax = x.spec.axes_of(d)
        size = x._gshape[d]
        if isinstance(i, slice):
            if i == slice(None):
                ents.append(ax or None); shape.append(size); local_idx.append(i)
            else:
                if ax:
                    _require_unsplit(x, d, "slicing")
                ents.append(None); shape.append(len(range(*i.indices(size)))); local_idx.append(i)
        elif isinstance(i, int):
            if ax:
                _require_unsplit(x, d, "integer indexing")
            local_idx.append(i)
        else:
            raise ShardingError("tensor (advanced) indexing of a ShardedTensor is not supported; "
                                "use meshpar.unshard or shard_map")
        d += 1
    loc = enter(x)[tuple(local_idx)]
    return wrap(loc, P(*ents, unreduced=x.spec.unreduced), x.mesh, shape)


@register(T.expand, T.expand_as)
def _expand(func, args, kwargs):
    x = args[0]
    if func is T.expand_as and not isinstance(x, ShardedTensor):
        return _expand_plain_as(x, args[1])
    if func is T.expand_as:
        sizes = list(args[1].shape)
    else:
        sizes = list(args[1]) if len(args) == 2 and isinstance(args[1], (tuple, list, torch.Size)) else list(args[1:])
    nd = len(x._gshape)
    off = len(sizes) - nd
    ents = [None] * off + [x.spec.axes_of(i) or None for i in range(nd)]
    sizes = [x._gshape[i - off] if s == -1 else s for i, s in enumerate(sizes)]
    loc_sizes = []
    for i, s in enumerate(sizes):
        ax = ents[i]
        if ax:
            loc_sizes.append(s // x.mesh.size(ax))
        else:
            loc_sizes.append(s)
    return wrap(enter(x).expand(loc_sizes), P(*ents, unreduced=x.spec.unreduced), x.mesh, sizes)


def _expand_plain_as(x: torch.Tensor, other: ShardedTensor) -> ShardedTensor:
    """``plain.expand_as(sharded)``: the plain tensor is a value (the same on every rank), so the
    result is ``other``'s layout without its partial-sum axes; each rank keeps its block of the
    broadcast (a free slice; the gradient of ``x`` is summed over the split axes)."""
    shape = tuple(other._gshape)
    spec = P(*other.spec.entries)
    loc = local_in(x.expand(shape), spec, len(shape), other.mesh)
    return wrap(loc, spec, other.mesh, shape)


@register(T.__setitem__)
def _setitem(func, args, kwargs):
    """``x[idx] = v``: in place on the blocks when ``idx`` is a mask laid out like ``x`` (or basic
    indexing of unsplit dims) and ``v`` a number; otherwise exactly, on the global value (an
    implicit all-gather, then ``x`` keeps its layout). Under autograd it refuses: use the
    out-of-place ``torch.where(mask, v, x)``."""
    x, idx, v = args
    if not isinstance(x, ShardedTensor):
        return NotImplemented
    if torch.is_grad_enabled() and (x.requires_grad or (isinstance(v, torch.Tensor) and v.requires_grad)):
        raise ShardingError(f"x[...] = v on a ShardedTensor {x.spec} that takes part in autograd; write it "
                            "out of place, e.g. x = torch.where(mask, v, x)")
    from ..sharding.generic import global_value, write_value
    from ..sharding.semantics import implicit
    number = isinstance(v, (int, float, bool))
    if number and not x.spec.unreduced:
        if isinstance(idx, ShardedTensor) and idx.dtype == torch.bool and idx.spec == x.spec \
                and idx._gshape == x._gshape:
            x._local[idx._local] = v
            return None
        basic = idx if isinstance(idx, tuple) else (idx,)
        if all(i is Ellipsis or isinstance(i, (int, slice)) for i in basic) and Ellipsis not in basic:
            if all(not x.spec.axes_of(d) for d in range(len(basic))):
                x._local[idx] = v
                return None
    with torch.no_grad():
        implicit("Tensor.__setitem__", f"gather {x.spec} -> P() and write back", x.mesh)
        g = global_value(x, "Tensor.__setitem__").clone()
        gi = tree_map(lambda t: global_value(t) if isinstance(t, ShardedTensor) else t, idx)
        gv = global_value(v) if isinstance(v, ShardedTensor) else v
        g[gi] = gv
        write_value(x, g)
    return None
