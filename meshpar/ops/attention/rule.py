"""``scaled_dot_product_attention`` on ShardedTensors sharded on the sequence dim.

The rule takes q/k/v ``[B, H, S, D]`` with one spec whose sequence dim (2) is split over mesh
axes ``sp`` (an axis, a tuple of axes, or ``Zigzag(axis)``) and whose head dim (3) is whole.
Batch and head dims may be split over other axes (data / tensor parallel); the result has q's
spec. The layout comes from the spec: ``P(None, None, Zigzag("sp"), None)`` is the load-balanced
causal layout (rank ``r`` holds chunks ``r`` and ``2sp-1-r``), a plain ``"sp"`` the contiguous
one. The algorithm (ring / all-to-all) and the block kernel come from
:func:`~meshpar.ops.attention.sequence_parallel`. Calls whose sequence dim is whole fall through
to the generic local rule.
"""
from __future__ import annotations

import torch.nn.functional as F

from ...errors import ShardingError
from ...sharding import P, ShardedTensor
from ...sharding.core import enter, reduce_unreduced, wrap
from ...sharding.dispatch import register
from ...sharding.spec import is_zigzag
from .api import sp_attention
from .checks import check_call
from .layout import check_balanced_len

_NAMES = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_DEFAULTS = (None, None, None, None, 0.0, False, None, False)


def _bind(args: tuple, kwargs: dict) -> dict:
    bound = dict(zip(_NAMES, _DEFAULTS))
    bound.update(zip(_NAMES, args))
    bound.update(kwargs)
    return bound


def _seq_axes(t) -> tuple[str, ...]:
    return t.spec.axes_of(len(t._gshape) - 2) if isinstance(t, ShardedTensor) and len(t._gshape) >= 2 else ()


@register(F.scaled_dot_product_attention)
def _sdpa_sequence_parallel(func, args, kwargs):
    """Ring or all-to-all attention when q/k/v are sharded on the sequence dim."""
    a = _bind(args, kwargs)
    q, k, v = a["query"], a["key"], a["value"]
    if not any(_seq_axes(t) for t in (q, k, v)):
        return NotImplemented
    specs = [getattr(t, "spec", "plain tensor (replicated)") for t in (q, k, v)]
    if not all(isinstance(t, ShardedTensor) for t in (q, k, v)) or len({s for s in specs}) != 1:
        raise ShardingError(f"sequence-parallel attention needs q, k, v with one spec, got q {specs[0]}, "
                            f"k {specs[1]}, v {specs[2]}; reshard them to the same spec, e.g. "
                            "P(None, None, 'sp', None)")
    if q.mesh != k.mesh or q.mesh != v.mesh:
        raise ShardingError(f"q, k, v live on different meshes ({q.mesh}, {k.mesh}, {v.mesh})")
    check_call(a["attn_mask"], a["dropout_p"])
    mesh, nd = q.mesh, len(q._gshape)
    if nd != 4:
        raise ShardingError(f"sequence-parallel attention expects q/k/v of shape [B, H, S, D], got global "
                            f"shape {tuple(q._gshape)}")
    sp_axes = _seq_axes(q)
    if q.spec.axes_of(nd - 1):
        raise ShardingError(f"sequence-parallel attention: the head dim (dim {nd - 1}) of q is split over "
                            f"{q.spec.axes_of(nd - 1)}; reshard it whole, e.g. {P(*q.spec.padded(nd)[:-1], None)}")
    sp = mesh.size(sp_axes)
    balanced = is_zigzag(sp_axes)
    if balanced:  # (shard/from_local validated this; kept for tensors built by other means)
        check_balanced_len(q._gshape[-2], sp, what="q sequence length (dim 2)")
        check_balanced_len(k._gshape[-2], sp, what="k/v sequence length (dim 2)")
    q, k, v = (reduce_unreduced(t) for t in (q, k, v))
    ql, kl, vl = (enter(t) for t in (q, k, v))
    out = sp_attention(ql, kl, vl, mesh, sp_axes, causal=bool(a["is_causal"]), scale=a["scale"],
                       balanced=balanced, enable_gqa=bool(a["enable_gqa"]))
    return wrap(out, P(*q.spec.entries), mesh, tuple(q._gshape[:-1]) + (v._gshape[-1],))
