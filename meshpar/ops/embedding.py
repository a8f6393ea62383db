"""Vocab-parallel embedding lookup.

Layout: ``weight [V, H]`` with spec ``P(Va, Ha)`` (vocabulary split over axes ``Va``, hidden over
``Ha``); token ids ``idx [B, T]`` (int ShardedTensor or a plain replicated tensor) with spec
``P(Ba, Ta)``. The output ``[B, T, H]`` has spec ``P(Ba, Ta, Ha)``.

Algorithm (Megatron's vocab-parallel embedding, generalised to any spec):

1. For each idx dimension, the axes that split both it and the vocabulary (``Ba ∩ Va``) are
   all-gathered (ids only: a few bytes per token), so every rank sees all ids its vocabulary
   slice may serve.
2. Each rank looks up the ids that fall into its vocabulary slice and writes zeros elsewhere:
   a partial sum over ``Va``.
3. The partial sums are reduced: reduce-scatter over ``Ba ∩ Va`` (back to the idx layout) and
   all-reduce over ``Va \\ (Ba ∪ Ta)``.

Backward is the dual (all-gather of the output gradient, local scatter-add). The weight gradient
is summed over the axes that split idx but not the vocabulary, where ranks see different tokens
with the same weight block.

Padding: a vocabulary padded to a multiple of the shard count just has rows no id reaches.

``F.embedding(idx, weight)`` with a ShardedTensor weight is registered with the dispatcher
(no ``padding_idx``/``max_norm``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import ShardingError
from ..mesh import collectives as C
from ..mesh.autograd import psum, psum_scatter
from ..sharding.core import enter, wrap
from ..sharding.dispatch import register
from ..sharding.layout import block_offset, local_shape
from ..sharding.spec import P, base_axis
from ..sharding.tensor import ShardedTensor


def embedding(idx: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Look up ``idx [*, ...]`` in ``weight [V, H]``; sharded when ``weight`` is a ShardedTensor.

    Returns ``[*idx.shape, H]`` with spec ``P(*idx.spec, weight.spec[1])``.
    """
    if not isinstance(weight, ShardedTensor):
        if isinstance(idx, ShardedTensor):
            raise ShardingError("embedding: sharded ids with a plain weight; shard the weight (e.g. P('tp', None))")
        return F.embedding(idx, weight)
    mesh = weight.mesh
    if weight.ndim != 2:
        raise ShardingError(f"embedding: weight must be [V, H], got shape {tuple(weight.shape)}")
    if weight.spec.unreduced:
        raise ShardingError(f"embedding: weight spec {weight.spec} is unreduced; reduce it first")
    if idx.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise ShardingError(f"embedding: ids must be an integer tensor, got {idx.dtype}")
    if isinstance(idx, ShardedTensor):
        if idx.mesh != mesh:
            raise ShardingError(f"embedding: ids live on {idx.mesh} but the weight on {mesh}")
        ispec, ids = idx.spec, idx._local
    else:
        ispec, ids = P(), idx
    nd = len(idx.shape)
    va, ha = weight.spec.axes_of(0), weight.spec.axes_of(1)
    idx_axes = [ispec.axes_of(d) for d in range(nd)]
    flat_idx_axes = ispec.sharded_axes()  # plain names (a zigzag ids dim is per token: order-free)
    clash = [a for a in map(base_axis, ha) if a in flat_idx_axes]
    if clash:
        raise ShardingError(f"embedding: mesh axis {clash[0]!r} splits both the ids {ispec} and the weight's hidden "
                            f"dim {weight.spec}; the output [.., H] can't be split twice over it. Shard the weight's "
                            f"hidden dim over other axes")
    V = weight.shape[0]
    if ids.numel():
        _check_ids_in_range(ids, V, mesh)
    v0 = block_offset(weight._gshape, weight.spec, mesh, 0)  # (refuses a zigzag vocab before any collective)
    vl = local_shape(weight._gshape, weight.spec, mesh)[0]
    gathered = [tuple(a for a in ax if base_axis(a) in va) for ax in idx_axes]
    for d, g in enumerate(gathered):
        if g:
            ids = C.all_gather(ids, mesh, g, dim=d)
    vary = tuple(a for a in flat_idx_axes if a not in va)
    w = enter(weight, vary)
    ids = ids.long()
    rel = ids - v0
    hit = (rel >= 0) & (rel < vl)
    out = F.embedding(torch.where(hit, rel, torch.zeros_like(rel)), w) * hit.unsqueeze(-1).to(w.dtype)
    for d, g in enumerate(gathered):
        if g:
            out = psum_scatter(out, mesh, g, dim=d)
    rest = tuple(a for a in va if a not in flat_idx_axes)
    if rest:
        out = psum(out, mesh, rest)
    spec = P(*[ax if ax else None for ax in idx_axes], ha if ha else None)
    return wrap(out, spec, mesh, (*idx.shape, weight.shape[1]))


def _check_ids_in_range(ids: torch.Tensor, V: int, mesh) -> None:
    """Refuse out-of-range token ids (masked lookups would silently give zeros).

    On CPU a plain check with a clear IndexError; on an accelerator a device-side assert
    (``torch._assert_async``), so a training step has no host sync."""
    ok = (ids.min() >= 0) & (ids.max() < V)
    if ids.device.type == "cpu":
        if not bool(ok):
            raise IndexError(f"embedding: a token id is out of range [0, {V}) on mesh rank {mesh.rank}")
    else:
        torch._assert_async(ok, f"embedding: a token id is out of range [0, {V})")


@register(F.embedding)
def _embedding_rule(func, args, kwargs):
    a = dict(zip(("input", "weight", "padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse"), args))
    a.update(kwargs)
    if not isinstance(a.get("weight"), ShardedTensor):
        return NotImplemented
    if a.get("padding_idx") is not None or a.get("max_norm") is not None or a.get("sparse", False) \
            or a.get("scale_grad_by_freq", False):
        raise ShardingError("embedding on a ShardedTensor weight supports no padding_idx/max_norm/sparse/"
                            "scale_grad_by_freq")
    return embedding(a["input"], a["weight"])
