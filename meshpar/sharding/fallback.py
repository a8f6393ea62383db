"""``__torch_dispatch__`` fallback: blockwise aten ops on operands of identical layout.

Torch calls aten ops on ShardedTensors by itself in a few places: the autograd engine (seeding
``ones_like`` for ``backward()``, adding gradients into ``.grad``), optimizers (in-place
updates under ``no_grad``), ``.to(dtype)``, ``detach``. These act elementwise on blocks, so
running them on the local blocks is exact when all sharded operands have the same spec and
global shape. Anything else raises a ShardingError.
"""
from __future__ import annotations

import torch
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from ..errors import ShardingError
from ..mesh import collectives as C
from .spec import P
from .tensor import ShardedTensor

aten = torch.ops.aten

_LIKE = {aten.ones_like.default, aten.zeros_like.default, aten.empty_like.default, aten.full_like.default,
         aten.rand_like.default, aten.randn_like.default}
_UNARY_SAME = {aten.detach.default, aten.alias.default, aten.clone.default, aten._to_copy.default,
               aten.view_as.default if hasattr(aten, "view_as") else aten.alias.default}
# linear ops: fine on unreduced operands
_LINEAR = {aten.add.Tensor, aten.add_.Tensor, aten.sub.Tensor, aten.sub_.Tensor, aten.neg.default,
           aten.mul.Scalar, aten.mul_.Scalar, aten.div.Scalar, aten.div_.Scalar, aten.copy_.default,
           aten.zero_.default, aten.detach.default, aten.alias.default, aten.clone.default, aten._to_copy.default}


def _is_pointwise(func) -> bool:
    return torch.Tag.pointwise in getattr(func, "tags", ())


def handle_dispatch(func, args, kwargs):
    if func is aten._local_scalar_dense.default:
        x = args[0]
        loc = x._local
        if x.spec.unreduced:
            loc = C.all_reduce(loc, x.mesh, x.spec.unreduced)
        return loc.item()
    if func in _LIKE:
        x = args[0]
        return ShardedTensor(func(x._local, *args[1:], **kwargs), x.spec.reduced(), x.mesh, x._gshape)
    name = func._schema.name
    if name.startswith("aten::_foreach_"):
        return _foreach(func, args, kwargs)
    flat, spec_tree = tree_flatten((args, kwargs))
    sts = [a for a in flat if isinstance(a, ShardedTensor)]
    first = sts[0]
    for s in sts[1:]:
        if s.spec != first.spec or s.mesh != first.mesh or s._gshape != first._gshape:
            raise ShardingError(f"{name}: operands have different layouts ({first.spec} {tuple(first._gshape)} vs "
                                f"{s.spec} {tuple(s._gshape)}); reshard them to one spec first")
    if not (func in _UNARY_SAME or func in _LINEAR or _is_pointwise(func) or func is aten.copy_.default):
        raise ShardingError(f"no sharding rule for aten op {name} on {first.spec}; use meshpar.unshard, "
                            "meshpar.reshard or meshpar.shard_map")
    if first.spec.unreduced and func not in _LINEAR:
        raise ShardingError(f"{name} is not linear, so it cannot run on an unreduced (partial-sum) tensor "
                            f"{first.spec}; reduce it first with meshpar.reshard(x, spec_without_unreduced)")
    for a in flat:
        if isinstance(a, torch.Tensor) and not isinstance(a, ShardedTensor) and a.numel() != 1:
            raise ShardingError(f"{name}: mixing a ShardedTensor {first.spec} with a plain tensor of shape "
                                f"{tuple(a.shape)} below autograd; shard the plain tensor first")
    local_flat = [a._local if isinstance(a, ShardedTensor) else a for a in flat]
    largs, lkwargs = tree_unflatten(local_flat, spec_tree)
    out = func(*largs, **lkwargs)
    if name.endswith("_") or func is aten.copy_.default:
        return args[0]

    def rewrap(t):
        if isinstance(t, torch.Tensor) and tuple(t.shape) == tuple(first._local.shape):
            return ShardedTensor(t, first.spec, first.mesh, first._gshape)
        return t
    return tree_map(rewrap, out)


def _foreach(func, args, kwargs):
    name = func._schema.name
    lists = [a for a in args if isinstance(a, (list, tuple)) and a and isinstance(a[0], torch.Tensor)]
    n = len(lists[0])
    template = lists[0]

    def unwrap(a):
        if isinstance(a, ShardedTensor):
            if a.spec.unreduced and func not in _LINEAR:
                raise ShardingError(f"{name} on an unreduced tensor {a.spec}; reduce it first")
            return a._local
        return a
    largs = tree_map(unwrap, args)
    lkwargs = tree_map(unwrap, kwargs)
    out = func(*largs, **lkwargs)
    if name.endswith("_"):
        return None
    if isinstance(out, (list, tuple)):
        res = []
        for i, t in enumerate(out):
            tpl = template[i]
            res.append(ShardedTensor(t, tpl.spec.reduced(), tpl.mesh, tpl._gshape) if isinstance(tpl, ShardedTensor) else t)
        return res
    return out
