"""Vocab-parallel cross-entropy: the loss of sharded logits without ever building full logits.

Layout: ``logits [..., V]`` with the vocabulary (last dim) split over axes ``Va`` and the
leading dims split over ``Ba``; ``targets [...]`` with spec ``P(Ba)`` (or a plain replicated
tensor, sliced locally for free).

Algorithm (per token, on ``[..., V/|Va|]`` blocks):

* ``m = pmax(max_v logits)`` over ``Va`` (a shift for stability, not differentiated);
* ``lse = m + log(psum(sum_v exp(logits - m)))`` over ``Va``;
* the target logit: each rank gathers it if the target id is in its vocabulary slice, zero
  otherwise, then ``psum`` over ``Va``;
* ``loss = lse - target_logit``; the mean over non-ignored tokens is a ``psum`` over ``Ba``.

Communication: three all-reduces of ``[...]``-sized (per-token) tensors over ``Va`` and two
scalars over ``Ba``. Backward needs none: each rank's logit gradient is
``softmax - onehot`` restricted to its slice.

Precision: bf16/fp16 logits are upcast to float32 for the loss (as ``logits.float()`` before
``F.cross_entropy``); the loss is float32 and the logits' gradient comes back in their dtype.

Padding: with ``vocab_size`` < V (the vocabulary was padded), the padded columns are masked to
``-inf``; the loss equals the dense loss over the real vocabulary.

``F.cross_entropy(logits [N, V], targets [N])`` with ShardedTensor logits is registered with the
dispatcher (no class weights or label smoothing).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import ShardingError
from ..mesh.autograd import pmax, psum
from ..sharding.api import reshard
from ..sharding.core import enter, reduce_unreduced, wrap
from ..sharding.dispatch import register
from ..sharding.layout import block_offset, local_shape, take_block
from ..sharding.spec import P
from ..sharding.tensor import ShardedTensor


def _loss_dtype(dtype: torch.dtype) -> torch.dtype:
    """bf16/fp16 logits are upcast: the log-sum-exp over a large vocabulary needs float32."""
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


def _dense(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, reduction: str,
           vocab_size: int | None) -> torch.Tensor:
    if vocab_size is not None and vocab_size < logits.shape[-1]:
        logits = logits[..., :vocab_size]
    logits = logits.to(_loss_dtype(logits.dtype))
    v = logits.shape[-1]
    return F.cross_entropy(logits.reshape(-1, v), targets.reshape(-1), ignore_index=ignore_index,
                           reduction=reduction).reshape(targets.shape if reduction == "none" else ())


def _refines(have: P, want: P, ndim: int) -> bool:
    """Whether ``want`` only splits further what ``have`` splits (per dim, ``have``'s axes are a prefix
    of ``want``'s), so resharding ``have`` -> ``want`` is a local slice without communication."""
    if have.unreduced:
        return False
    for d in range(ndim):
        h, w = have.axes_of(d), want.axes_of(d)
        if tuple(w[:len(h)]) != tuple(h):
            return False
    return True


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, *, ignore_index: int = -100,
                  reduction: str = "mean", vocab_size: int | None = None) -> torch.Tensor:
    """Cross-entropy with the class dimension **last**.

    Args:
        logits: ``[..., V]``, plain or ShardedTensor (vocab may be split over any axes).
        targets: ``[...]`` int ids in ``[0, vocab_size)`` or ``ignore_index``; ShardedTensor with
            ``logits``' leading spec, or a plain tensor (global, replicated).
        reduction: "mean" (over non-ignored tokens), "sum" or "none".
        vocab_size: the real vocabulary when ``V`` was padded.
    Returns:
        a scalar (ShardedTensor ``P()`` for sharded logits) or, for "none", ``[...]`` with
        ``logits``' leading spec.
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if tuple(targets.shape) != tuple(logits.shape[:-1]):
        raise ShardingError(f"cross_entropy: targets shape {tuple(targets.shape)} must be logits shape "
                            f"{tuple(logits.shape)} without the last (class) dim")
    V = logits.shape[-1]
    vocab_size = V if vocab_size is None else int(vocab_size)
    if not 0 < vocab_size <= V:
        raise ShardingError(f"cross_entropy: vocab_size {vocab_size} must be in [1, {V}]")
    if not isinstance(logits, ShardedTensor):
        if isinstance(targets, ShardedTensor):
            raise ShardingError("cross_entropy: sharded targets with plain logits; unshard the targets")
        return _dense(logits, targets, ignore_index, reduction, vocab_size)
    mesh = logits.mesh
    if logits.spec.unreduced:
        logits = reduce_unreduced(logits)
    nd = logits.ndim
    lead = P(*[logits.spec.entries[d] if d < len(logits.spec) else None for d in range(nd - 1)])
    if isinstance(targets, ShardedTensor):
        if targets.mesh != mesh:
            raise ShardingError(f"cross_entropy: targets live on {targets.mesh}, the logits on {mesh}")
        if targets.spec != lead:
            if not _refines(targets.spec, lead, nd - 1):
                raise ShardingError(f"cross_entropy: targets spec {targets.spec} must equal the logits' leading "
                                    f"spec {lead} (logits {logits.spec}); reshard the targets to {lead}")
            # e.g. a data rank's labels P("data") for logits P(("data", "x"), None, "y"): a free local slice
            targets = reshard(targets, lead)
        t = targets._local
    else:
        t = take_block(targets, lead, mesh) if nd > 1 else targets
    va = logits.spec.axes_of(nd - 1)
    ba = lead.sharded_axes()
    v0 = block_offset(logits._gshape, logits.spec, mesh, -1)
    vl = local_shape(logits._gshape, logits.spec, mesh)[-1]

    x = enter(logits)
    x = x.to(_loss_dtype(x.dtype))
    if v0 + vl > vocab_size:
        real = torch.arange(v0, v0 + vl, device=x.device) < vocab_size
        x = x.masked_fill(~real, float("-inf"))
    m = x.detach().amax(-1, keepdim=True)
    if va:
        m = pmax(m, mesh, va)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    sumexp = (x - m).exp().sum(-1)
    if va:
        sumexp = psum(sumexp, mesh, va)
    lse = m.squeeze(-1) + sumexp.log()
    t = t.long()
    rel = t - v0
    hit = (rel >= 0) & (rel < vl)
    picked = x.gather(-1, torch.where(hit, rel, torch.zeros_like(rel)).unsqueeze(-1)).squeeze(-1)
    picked = torch.where(hit, picked, torch.zeros_like(picked))
    if va:
        picked = psum(picked, mesh, va)
    valid = t != ignore_index
    per_tok = torch.where(valid, lse - picked, torch.zeros_like(lse))
    if reduction == "none":
        return wrap(per_tok, lead, mesh, logits._gshape[:-1])
    total = per_tok.sum()
    if ba:
        total = psum(total, mesh, ba)
    if reduction == "mean":
        count = valid.sum().to(total.dtype)
        if ba:
            count = psum(count, mesh, ba)
        total = total / count
    return wrap(total, P(), mesh, ())


@register(F.cross_entropy)
def _cross_entropy_rule(func, args, kwargs):
    names = ("input", "target", "weight", "size_average", "ignore_index", "reduce", "reduction", "label_smoothing")
    a = dict(zip(names, args))
    a.update(kwargs)
    x = a["input"]
    if not isinstance(x, ShardedTensor):
        return NotImplemented
    if a.get("weight") is not None or a.get("label_smoothing", 0.0) or a.get("size_average") is not None \
            or a.get("reduce") is not None:
        raise ShardingError("cross_entropy on ShardedTensor logits supports no class weights, label smoothing or "
                            "legacy size_average/reduce")
    if x.ndim != 2:
        raise ShardingError(f"cross_entropy on ShardedTensor logits takes [N, V] (got {tuple(x.shape)}); use "
                            "meshpar.ops.cross_entropy.cross_entropy for [..., V] with the class dim last")
    return cross_entropy(x, a["target"], ignore_index=a.get("ignore_index", -100),
                         reduction=a.get("reduction", "mean"))
