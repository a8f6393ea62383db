"""softmax / log_softmax / layer_norm / scaled_dot_product_attention when the dims they work
across are not split: these run blockwise. (Sharded-hidden norms, vocab-parallel losses and
sequence-parallel attention are registered on top of these by :mod:`meshpar.nn` and
:mod:`meshpar.ops.attention`.)"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import ShardingError
from ..sharding.core import local_in, reduce_unreduced, wrap
from ..sharding.dispatch import register, remember_grad, remember_same_call
from ..sharding.tensor import ShardedTensor
from ._util import common_mesh, norm_dim

T = torch.Tensor


@register(torch.softmax, T.softmax, F.softmax, torch.log_softmax, T.log_softmax, F.log_softmax)
def _softmax(func, args, kwargs):
    x = args[0]
    if not isinstance(x, ShardedTensor):
        return NotImplemented
    was_unreduced = bool(x.spec.unreduced)
    x = reduce_unreduced(x)
    nd = len(x._gshape)
    dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
    if dim is None:
        raise ShardingError("softmax on a ShardedTensor needs an explicit dim")
    d = norm_dim(dim, nd)
    if x.spec.axes_of(d):
        raise ShardingError(f"{func.__name__} across dim {d}, which is split over {x.spec.axes_of(d)}; "
                            "reshard that dim to replicated, or use the vocab-parallel cross-entropy")
    rest = {k: v for k, v in kwargs.items() if k != "dim"}
    if not was_unreduced:  # an unreduced input needs its psum first: not memoised
        remember_same_call(func, args, kwargs, x.spec, x._gshape)
        extra = args[2:]  # not ``args``: the memo must not keep this call's operand alive
        remember_grad(func, args, kwargs, lambda loc: func(loc, d, *extra, **rest), x.spec, x._gshape, x.mesh)
    out = func(local_in(x, x.spec, nd, x.mesh), d, *args[2:], **rest)
    return wrap(out, x.spec, x.mesh, x._gshape)


@register(F.layer_norm)
def _layer_norm(func, args, kwargs):
    x = args[0]
    if not isinstance(x, ShardedTensor):
        return NotImplemented
    x = reduce_unreduced(x)
    shape = tuple(kwargs.get("normalized_shape", args[1]))
    nd = len(x._gshape)
    for d in range(nd - len(shape), nd):
        if x.spec.axes_of(d):
            return NotImplemented  # a sharded-hidden rule (meshpar.nn) may take it
    weight = kwargs.get("weight", args[2] if len(args) > 2 else None)
    bias = kwargs.get("bias", args[3] if len(args) > 3 else None)
    eps = kwargs.get("eps", args[4] if len(args) > 4 else 1e-5)
    mesh = x.mesh
    w = local_in(reduce_unreduced(weight) if isinstance(weight, ShardedTensor) else weight, x.spec, nd, mesh)
    b = local_in(reduce_unreduced(bias) if isinstance(bias, ShardedTensor) else bias, x.spec, nd, mesh)
    out = F.layer_norm(local_in(x, x.spec, nd, mesh), shape, w, b, eps)
    return wrap(out, x.spec, mesh, x._gshape)


@register(F.scaled_dot_product_attention)
def _sdpa_local(func, args, kwargs):
    """Batch- or head-split q/k/v [B, H, S, D] with whole sequences: plain local attention."""
    q, k, v = args[:3]
    sts = [t for t in (q, k, v) if isinstance(t, ShardedTensor)]
    mesh = common_mesh(sts)
    q, k, v = (reduce_unreduced(t) if isinstance(t, ShardedTensor) else t for t in (q, k, v))
    specs = {t.spec for t in (q, k, v) if isinstance(t, ShardedTensor)}
    if len(specs) != 1 or len(sts) != 3:
        raise ShardingError(f"scaled_dot_product_attention needs q, k, v with one spec, got "
                            f"{[getattr(t, 'spec', 'plain') for t in (q, k, v)]}; reshard them to match")
    spec = q.spec
    nd = len(q._gshape)
    if spec.axes_of(nd - 2) or spec.axes_of(nd - 1):
        return NotImplemented
    if kwargs.get("attn_mask") is not None or (len(args) > 3 and args[3] is not None):
        raise ShardingError("scaled_dot_product_attention with attn_mask on ShardedTensors is not supported; "
                            "use is_causal=True or shard_map")
    out = func(*(local_in(t, spec, nd, mesh) for t in (q, k, v)), *args[3:], **kwargs)
    return wrap(out, spec, mesh, q._gshape)
